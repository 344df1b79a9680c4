"""Helpers for ml_collections configs: `get_config(arg)` argument parsing and loading a file.

A config file's `get_config(arg)` takes a string like "size=tiny,lang=zh". Unknown keys are an
error that names the key and the closest known ones, the same courtesy ml_collections gives
`--config.x=y` overrides of a locked config.
"""
from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from rlhf_jax.config import sections
# Section builders that config files, tests and benchmarks reach as config_util.<name>.
from rlhf_jax.config.sections import (  # noqa: F401
    distributed_section, mesh_section, model_section, pretrained_model_section)


def _coerce(value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() in ("1", "true", "yes"):
      return True
    if value.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"expected a boolean, got {value!r}")
  if isinstance(default, int):
    return int(value)
  if isinstance(default, float):
    return float(value)
  return value


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "k1=v1,k2=v2" against `defaults` (which fixes the known keys and their types)."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not of the form key=value "
                       f"(known keys: {sorted(defaults)})")
    key, value = item.split("=", 1)
    key = key.strip()
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=3)
      hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
      raise ValueError(f"unknown config argument {key!r}{hint} (known: {sorted(defaults)})")
    try:
      out[key] = _coerce(value.strip(), defaults[key])
    except ValueError as e:
      raise ValueError(f"config argument {key}={value!r}: {e}") from None
  return ml_collections.ConfigDict(out)


def base_lm_config(arg) -> ml_collections.ConfigDict:
  """Everything a next-token trainer reads (configs/pretrain.py, sft.py, sft_hf.py): `arg`
  holds size, steps, batch and seq_len; config files set what their experiment changes."""
  config = sections.run_config("lm", "lm", arg.size)
  config.init_from = ""
  config.data = sections.text_data_section(
      "", sections.batch_for(arg.size, arg.batch), min(arg.seq_len, config.model.max_len))
  config.optim = sections.optim_section()
  config.train = sections.train_section(arg.steps)
  return config


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Builds a config from "path/to/file.py[:args]", as --config=... does on the command line.

  Relative paths are looked up from the working directory, then from the repository root.
  """
  import importlib.util
  import os
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, path)):
      path = os.path.join(root, path)
    else:
      raise FileNotFoundError(f"no config file {path}")
  module_spec = importlib.util.spec_from_file_location(
      f"_config_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.lock()
  return config


def parse_by_lang(text: str, field: str, *, what: str, integer: bool = False,
                  minimum: float = 0, langs: tuple = (), langs_field: str = "data.lang") -> dict:
  """A per-language setting ('zh:0.1' or 'en:128,zh:384') as {lang: value}; '' = {}.

  `field` and `what` name it in errors ("kl.coef_by_lang='zh': 'zh' is not 'lang:beta' (beta >=
  0)"); a value under `minimum`, not a number (an integer when `integer`), or a language the run
  does not have (langs, when given; set by `langs_field`) is an error.
  """
  out = {}
  for item in (t.strip() for t in str(text or "").split(",")):
    if not item:
      continue
    lang, _, raw = (part.strip() for part in item.partition(":"))
    try:
      value = int(raw) if integer else float(raw)
    except ValueError:
      value = float("nan")
    if not lang or not value >= minimum:
      raise ValueError(f"{field}={text!r}: {item!r} is not 'lang:{what}' ({what} >= {minimum})")
    if langs and lang not in langs:
      raise ValueError(f"{field}={text!r}: {lang!r} is not one of the run's languages "
                       f"{list(langs)} ({langs_field})")
    out[lang] = value
  return out


def parse_coef_by_lang(text: str, langs: tuple = ()) -> dict[str, float]:
  """`kl.coef_by_lang` ('zh:0.1' or 'en:0.07,zh:0.1') as {lang: β}: one β a language."""
  return parse_by_lang(text, "kl.coef_by_lang", what="beta", langs=langs)
