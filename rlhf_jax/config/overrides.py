"""`--config.<field>=<value>` overrides: an unknown field is a one-line error that names the
closest fields, or, when none is close, every field of the section it was looked up in.

ml_collections' config_flags raises a bare AttributeError from deep inside flag parsing for an
unknown field ('"klcoef"', with a "did you mean" only for a near spelling of a sibling);
`flags_parser` is an `app.run(main, flags_parser=...)` that turns it into that error.
"""
from __future__ import annotations

import difflib
import re
import sys
from typing import Callable

import ml_collections
from absl import flags

from rlhf_jax.config import util as config_util


def field_paths(config, prefix: str = "") -> list[str]:
  """Every field of a config as a dotted path ('ppo.kl.coef'); sections are not fields."""
  out = []
  for key in config.keys():
    if isinstance(config[key], ml_collections.ConfigDict):
      out += field_paths(config[key], f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def _plain(path: str) -> str:
  """Compared without case, dots or underscores: 'klcoef' is 'kl.coef' run together."""
  return re.sub(r"[._]", "", path.lower())


def closest_fields(config, path: str, section: str, n: int = 3,
                   cutoff: float = 0.75) -> list[str]:
  """The fields nearest `path`, whose known part is `section` ('' = none): nearest as a whole
  path, or by what follows the section, looked up under the section or anywhere (a field put
  in the wrong section, 'ppo.klcoef' for 'kl.coef')."""
  rest = path[len(section) + 1:] if section else path

  def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, _plain(a), _plain(b)).ratio()

  scored = []
  for field in field_paths(config):
    inside = bool(section) and field.startswith(section + ".")
    score = max(similarity(path, field), similarity(rest, field),
                similarity(rest, field[len(section) + 1:]) if inside else 0.0)
    if score >= cutoff:
      scored.append((-score, not inside, field))  # ties: the section's own fields first
  scored.sort()
  # Only those about as near as the nearest: a clear match is named alone.
  return [field for score, _, field in scored[:n] if score <= scored[0][0] + 0.1]


def unknown_field_message(config, path: str) -> str | None:
  """None when `path` names a field or section of `config`; else the error to show."""
  node, known = config, []
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node.keys():
      break
    node, known = node[part], known + [part]
  else:
    return None
  section = ".".join(known)
  close = closest_fields(config, path, section)
  if close:
    return f"unknown config field {path!r}; did you mean {' or '.join(close)}?"
  if not isinstance(node, ml_collections.ConfigDict):  # below a field: 'kl.coef.x'
    return f"unknown config field {path!r}; {section} is a field, not a section"
  where = f"config.{section}" if section else "the config"
  return f"unknown config field {path!r}; {where} has {', '.join(sorted(node.keys()))}"


def override_paths(argv, name: str = "config") -> list[str]:
  """The fields `--<name>.<field>=...` sets on a command line."""
  pattern = re.compile(rf"^--?{re.escape(name)}\.([^=]+)")
  return [m.group(1) for m in map(pattern.match, argv[1:]) if m]


def config_spec(argv, name: str = "config", default: str = "") -> str:
  """The `--<name>=<file[:args]>` of a command line (either spelling), else `default`."""
  for i, arg in enumerate(argv[1:], 1):
    m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
    if m:
      return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else default)
  return default


def override_error(argv, name: str = "config", default: str = "") -> str | None:
  """The error for the first unknown override field on the command line, or None."""
  spec = config_spec(argv, name, default)
  if not spec:
    return None
  config = config_util.load_config(spec)
  for path in override_paths(argv, name):
    message = unknown_field_message(config, path)
    if message:
      return f"--{name}.{path}: {message}"
  return None


def parse_flags(argv, name: str = "config", default: str = "", flag_values=None):
  """`flag_values(argv)`, with an unknown `--<name>.<field>` an IllegalFlagValueError naming
  the closest fields (instead of config_flags' bare AttributeError / KeyError)."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(argv)
  except (AttributeError, KeyError) as e:
    message = override_error(argv, name, default)
    if message is None:
      raise
    raise flags.IllegalFlagValueError(message) from e


def flags_parser(name: str = "config", default: str = "") -> Callable:
  """For `app.run(main, flags_parser=...)`: parse_flags, with a flag error printed as absl
  prints one (no traceback) and exit status 1."""
  def parse(argv):
    try:
      return parse_flags(argv, name, default)
    except flags.Error as e:
      sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                       "Pass --helpshort or --helpfull to see help on flags.\n")
      sys.exit(1)
  return parse
