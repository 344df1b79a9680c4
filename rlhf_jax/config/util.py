"""Helpers for ml_collections configs: `get_config(arg)` argument parsing and size presets.

A config file's `get_config(arg)` takes a string like "size=tiny,lang=zh". Unknown keys are an
error that names the key and the closest known ones, the same courtesy ml_collections gives
`--config.x=y` overrides of a locked config.
"""
from __future__ import annotations

import difflib
from typing import Any

import ml_collections


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


def model_section(size: str, **overrides) -> ml_collections.ConfigDict:
  """`config.model`: the named size's fields (see rlhf_jax/models/sizes.py) plus overrides."""
  from rlhf_jax.models.sizes import SIZES
  if size not in SIZES:
    close = difflib.get_close_matches(size, list(SIZES), n=3)
    raise ValueError(f"unknown model size {size!r}; known: {sorted(SIZES)}"
                     + (f"; did you mean {close[0]!r}?" if close else ""))
  fields = dict(size=size, vocab_size=8192, n_kv_heads=SIZES[size]["n_heads"], head_dim=0,
                rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False,
                dtype="float32", remat=False, scan_layers=False)
  fields.update(SIZES[size])
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def mesh_section(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """`config.mesh`: device counts per mesh axis; -1 takes the devices the others leave."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def distributed_section() -> ml_collections.ConfigDict:
  """`config.distributed`: multi-host set-up, passed to jax.distributed.initialize.

  On TPU pods and SLURM/Open MPI GPU clusters `initialize=True` alone is enough (JAX finds the
  coordinator itself); elsewhere give the coordinator address and this process's id.
  """
  return ml_collections.ConfigDict(dict(initialize=False, coordinator_address="",
                                        num_processes=0, process_id=-1, local_device_ids=""))


def base_lm_config(arg) -> ml_collections.ConfigDict:
  """Everything a next-token trainer reads; config files set what their experiment changes."""
  tiny = arg.size == "tiny"
  config = ml_collections.ConfigDict()
  config.trainer = "lm"
  config.stage = "lm"
  config.seed = 0
  config.init_from = ""

  config.model = model_section(arg.size)
  config.tokenizer = ml_collections.ConfigDict(dict(
      path="",  # "" = train one from the bundled text into <workdir>/tokenizer/ on first use
      # Chinese needs ~3.3k single characters at 0.9995 coverage: tiny trades coverage for size
      # (rarer characters fall back to bytes), the others keep room for real merges.
      vocab_size=2048 if tiny else 8192,
      character_coverage=0.995 if tiny else 0.9995))
  config.model.vocab_size = config.tokenizer.vocab_size

  config.data = ml_collections.ConfigDict(dict(
      name="", split="train", data_dir="",  # "" = ~/.cache/rlhf_jax/tfds
      text_field="text",  # for datasets of plain text; records with `messages` are chats
      batch_size=8 if tiny else arg.batch, seq_len=min(arg.seq_len, config.model.max_len),
      pack=True))

  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=10, schedule="cosine", end_lr_fraction=0.1,
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0, grad_accum=1,
      embed_lr_multiplier=1.0))

  config.train = ml_collections.ConfigDict(dict(
      steps=arg.steps, log_every=max(1, min(20, arg.steps // 10)),
      checkpoint_every=max(arg.steps // 4, 1), max_to_keep=2,
      stop_after=0))  # > 0: save and stop after this many steps (time-limited jobs); resumable

  config.mesh = mesh_section()
  config.axis_rules = [list(r) for r in _default_rules()]
  config.distributed = distributed_section()
  return config


_PRETRAINED_DEFAULTS = dict(head_dim=0, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False,
                           rope_scaling="", rope_factor=1.0, rope_low_freq_factor=1.0,
                           rope_high_freq_factor=4.0, rope_original_max_len=8192)


def pretrained_model_section(model: str, path: str = "", dtype: str = "float32"):
  """(`config.model`, source) of an imported model: a preset of rlhf_jax/models/pretrained.py
  or a Hugging Face directory / .gguf file, whose config.json or header gives the shape.

  `source` is where its weights and tokenizer are (`path` for a shape-only preset). Shared by
  every config that starts from a pretrained model (sft_hf, and reward / ppo with `model=`).
  """
  import os
  from rlhf_jax.models import pretrained
  if model in pretrained.SHAPES:
    fields = dict(pretrained.SHAPES[model])
    name = model
  else:
    from rlhf_jax.models import hf_import
    if not hf_import.is_pretrained_path(model):
      raise ValueError(f"model={model!r} is neither a preset ({sorted(pretrained.SHAPES)}) nor "
                       "a Hugging Face directory or .gguf file")
    fields = hf_import.open_checkpoint(model)[0]
    name = os.path.basename(model.rstrip("/"))
  fields = {**_PRETRAINED_DEFAULTS, **fields}
  # Scanned layers compile once per model, not once per layer (30 layers for SmolLM2).
  section = ml_collections.ConfigDict(dict(size=name, **fields, dtype=dtype,
                                           remat=fields["d_model"] >= 1024, scan_layers=True))
  return section, path or model


def _default_rules():
  from rlhf_jax.core.sharding import DEFAULT_AXIS_RULES
  return DEFAULT_AXIS_RULES


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
