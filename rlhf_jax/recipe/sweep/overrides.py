"""Per-run config overrides: dotted keys checked against the base config, set through
ml_collections.

ml_collections does the setting and the typing (a locked ConfigDict refuses a value of the
wrong type; --set text is parsed by the same field parsers as the pipeline's `--config.KEY=`
flags, so a --set value means what it would in a printed command). What it lacks, and this
module adds, is an error that names the closest real keys when a key is misspelt, and one that
says a key is a whole section rather than a field.
"""
from __future__ import annotations

import copy
import difflib
from typing import Any, Mapping

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

NAME_KEY = "_name"  # in a run's dict: the run's own name, not a config key


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every field's dotted key, sections left out: "ppo.kl.coef", "seed", ..."""
  out = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += leaf_keys(value, f"{prefix}{key}.")
    else:
      out.append(prefix + key)
  return out


def check_key(config: ml_collections.ConfigDict, key: str, where: str = "") -> None:
  """Raises ValueError unless `key` names one field of `config` (not a section)."""
  leaves = leaf_keys(config)
  if key in leaves:
    return
  inside = sorted(leaf for leaf in leaves if leaf.startswith(key + "."))
  if inside:
    raise ValueError(f"{where}{key!r} is a config section, not a field; set one of {inside}")
  close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
  hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
  raise ValueError(f"{where}unknown config key {key!r}{hint}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str = "") -> ml_collections.ConfigDict:
  """A copy of the (locked) config with each dotted key set; the original is left as it is.

  A key that names no field, or a whole section, is an error naming the closest known keys;
  a value of the wrong type is an error naming the key. `where` prefixes the messages.
  """
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    if key == NAME_KEY:
      continue
    check_key(config, key, where)
    try:
      config_path.set_value(key, config, value)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}cannot set {key}={value!r}: {e}") from None
  return config


def parse_set(item: str, config: ml_collections.ConfigDict) -> tuple[str, Any]:
  """Parses "ppo.train.steps=2" into ("ppo.train.steps", 2), typed after the field it sets.

  The text goes through ml_collections' own `--config.KEY=VALUE` parsing of a copy of
  `config`: what parses here parses in the pipeline command `commands` prints.
  """
  if "=" not in item:
    raise ValueError(f"--set {item!r} is not of the form key=value")
  key, text = (s.strip() for s in item.split("=", 1))
  check_key(config, key, "--set: ")
  argv = ["sweep", f"--config.{key}={text}"]
  values = flags.FlagValues()
  try:  # a field ml_collections cannot parse (a list) fails already here
    holder = config_flags.DEFINE_config_dict("config", copy.deepcopy(config),
                                             flag_values=values, sys_argv=argv)
    values(argv)
  except flags.Error as e:
    raise ValueError(f"--set {key}={text!r}: {e}") from None
  return key, config_path.get_value(key, holder.value)
