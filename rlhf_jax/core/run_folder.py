"""A run folder: what a training run writes, and the record that says what its checkpoint is.

Layout (every path below is relative to the run folder, so a run copied anywhere works the same):

  run.json                  the record: which model the checkpoint's params are (its resolved
                            ModelConfig, vocabulary included), and which tokenizer reads its ids
  checkpoints/<step>/       orbax: params, train state, data position, config (core/checkpoint.py)
  tokenizer/tokenizer.model a copy of the run's sentencepiece tokenizer (for an imported model's
                            own tokenizer the record holds its identity instead: a preset name or
                            an absolute path, the only kind of path that points outside the run)

A LoRA run (record's model.lora_rank > 0) saves only its adapters and heads; its record's
`base` names the frozen base they sit on (a preset name, or the absolute path and step of the
run it started from, plus a fingerprint of the base's values). Readers rebuild the whole model
from both and fold the adapters in (`load_policy`, `restore_params`); a base that is missing or
no longer the recorded one is an error naming both.
  metrics.jsonl, events.*   metrics (core/metrics.py)

Why a record: without it, a checkpoint's shape and tokenizer had to be reconstructed by
searching the configs of the runs it came from until parameter shapes matched. The record is
written by the trainer before its first step, from the very objects it trains with, and every
reader (chat, evaluation, later stages) asks this module, never another run's config.

A record is checked against the run's contents where it matters: the tokenizer copy carries its
sha256 and a copy that differs (corrupt, replaced) is an error naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Optional

import flax.linen as nn
import jax

from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.models import hf_import, layer_layout, lora, pretrained, quant
from rlhf_jax.models.heads import trunk_of
from rlhf_jax.models.transformer import NUMERICS_FIELDS, ModelConfig
from rlhf_jax.text.hf_tokenizer import load_any_tokenizer

log = logging.getLogger(__name__)

RECORD_FILE = "run.json"
CHECKPOINTS = "checkpoints"
TOKENIZER_FILE = os.path.join("tokenizer", "tokenizer.model")
FORMAT = 1
KINDS = ("policy", "scalar")  # a language model's params, or a reward model's / critic's


class RunFolderError(ValueError):
  """A run folder that is missing, unrecorded, or whose contents disagree with its record."""


# ------------------------------------------------------------------------------------ paths


def root(path: str) -> str:
  """The run folder of `path`, which may be the run folder or its checkpoints/ directory."""
  path = os.path.abspath(path)
  return os.path.dirname(path) if os.path.basename(path) == CHECKPOINTS else path


def checkpoint_dir(path: str) -> str:
  """The orbax directory of a run folder (or of the checkpoints/ directory itself)."""
  return os.path.join(root(path), CHECKPOINTS)


def tokenizer_file(run: str) -> str:
  """Where a run keeps (or trains) its own sentencepiece tokenizer."""
  return os.path.join(root(run), TOKENIZER_FILE)


def has_checkpoint(path: str) -> bool:
  """Whether `path` (a run folder or its checkpoints/) holds at least one saved step."""
  directory = checkpoint_dir(path)
  return os.path.isdir(directory) and any(
      name.isdigit() and os.path.isdir(os.path.join(directory, name))
      for name in os.listdir(directory))


def checkpointer(run: str, max_to_keep: Optional[int] = 3,
                 async_save: bool = True) -> ckpt_lib.Checkpointer:
  return ckpt_lib.Checkpointer(checkpoint_dir(run), max_to_keep=max_to_keep,
                               async_save=async_save)


def reader(run: str) -> ckpt_lib.Checkpointer:
  """A checkpointer for reading a finished run (no async saves, nothing deleted)."""
  if not os.path.isdir(checkpoint_dir(run)):
    raise FileNotFoundError(f"{root(run)} is not a run folder: no {CHECKPOINTS}/ directory")
  return checkpointer(run, max_to_keep=None, async_save=False)


def latest_step(run: str) -> Optional[int]:
  """The newest saved step of a run, None when it has none yet."""
  if not has_checkpoint(run):
    return None
  ckpt = reader(run)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def read_saved_config(run: str, step: Optional[int] = None) -> dict:
  """The config a run saved with its checkpoint (the latest step unless given)."""
  ckpt = reader(run)
  try:
    return ckpt.read_config(step) or {}
  finally:
    ckpt.close()


# ----------------------------------------------------------------------------------- record


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def tokenizer_identity(tokenizer, run: str) -> dict:
  """What the record says of a tokenizer; copies a sentencepiece model into the run folder."""
  if tokenizer is None:  # synthetic token streams: no text, no tokenizer
    return {"kind": "none"}
  source = getattr(tokenizer, "path", "") or ""
  if source.endswith(".model"):
    target = tokenizer_file(run)
    if os.path.abspath(source) != target:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.copyfile(source, target + ".tmp")
      os.replace(target + ".tmp", target)
    return {"kind": "sentencepiece", "path": TOKENIZER_FILE, "sha256": _sha256(target),
            "vocab_size": int(tokenizer.vocab_size)}
  # An imported model's own tokenizer: a preset name stays a name, a path becomes absolute.
  name = source if source in pretrained.SHAPES else os.path.abspath(source)
  return {"kind": "pretrained", "source": name, "vocab_size": int(tokenizer.vocab_size)}


def _model_fields(model_config: ModelConfig) -> dict:
  """The config as JSON reads it back (tuples become lists), so records compare equal."""
  return json.loads(json.dumps(dataclasses.asdict(model_config)))


# The numerics a run may change when it resumes. Not scan_layers: a resumed run reads back its
# optimizer state, saved in the run's own layer layout.
_RESUMABLE_NUMERICS = tuple(f for f in NUMERICS_FIELDS if f != "scan_layers")


def _shape(fields: dict) -> dict:
  """What a record's params are: every field but the numerics a run may change on resume."""
  return {k: v for k, v in fields.items() if k not in _RESUMABLE_NUMERICS}


def write_record(run: str, *, model_config: ModelConfig, tokenizer, kind: str,
                 extra: Optional[dict] = None) -> dict:
  """Writes run.json (process 0), or checks the one already there describes the same model.

  A resumed run finds its own record; a workdir that holds another model's run is an error
  rather than a silent mix of two runs.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  run = root(run)
  path = os.path.join(run, RECORD_FILE)
  record = {"format": FORMAT, "kind": kind, "model": _model_fields(model_config),
            **(extra or {})}
  if record.get("base"):
    record["base"] = _with_relative_source(record["base"], run)
  if os.path.exists(path):
    old = read_record(run)
    # A field a record predates (lora_*, vocab_chunk) reads as its default: an old run resumes.
    defaults = _model_fields(ModelConfig())
    was = _shape({**defaults, **old.get("model", {})})
    now = _shape(record["model"])
    old_base, new_base = (_base_key(old.get("base")), _base_key(record.get("base")))
    if (old.get("kind"), was, old_base) != (kind, now, new_base):
      fields = ([f"kind: recorded {old.get('kind')}, this run {kind}"]
                if old.get("kind") != kind else [])
      if old_base != new_base:
        fields.append(f"LoRA base: recorded {old.get('base')}, this run {record.get('base')}")
      fields += [f"model.{k}: recorded {was.get(k)}, this run {now.get(k)}"
                 for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
      raise RunFolderError(f"{path} holds another model's run ({'; '.join(fields)}): use a fresh "
                           "workdir, or the config that made it")
  if jax.process_index() != 0:
    return record
  os.makedirs(run, exist_ok=True)
  record["tokenizer"] = tokenizer_identity(tokenizer, run)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, sort_keys=True)
  os.replace(path + ".tmp", path)
  return record


def read_record(run: str) -> dict:
  """The record of a run folder; a clear error for a folder made before runs had one."""
  path = os.path.join(root(run), RECORD_FILE)
  if not os.path.exists(path):
    if not os.path.isdir(root(run)):
      raise FileNotFoundError(f"no run folder {root(run)}")
    raise RunFolderError(
        f"{root(run)} has no {RECORD_FILE}: it was made before run folders recorded their model "
        "and tokenizer. Re-create it by running its stage again into a fresh workdir (for a "
        "pipeline: python -m rlhf_jax.recipe.pipeline ... --only=<stage>).")
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunFolderError(f"{path}: not a valid run record ({e})") from None
  if not isinstance(record, dict) or "model" not in record or "kind" not in record:
    raise RunFolderError(f"{path}: not a run record (needs 'kind' and 'model')")
  return record


def model_config(run: str, **numerics: Any) -> ModelConfig:
  """The ModelConfig of a run's params, with numerics (dtype, remat, ...) optionally replaced:
  a later stage keeps the shape and computes in its own precision."""
  fields = dict(read_record(run)["model"])
  fields.update(numerics)
  return ModelConfig.from_config(fields)


def tokenizer(run: str):
  """The tokenizer a run's ids are in: its own copy (checked against the record's sha256), or
  the imported model's tokenizer the record names."""
  record = read_record(run)
  entry = record.get("tokenizer") or {"kind": "none"}
  if entry["kind"] == "none":
    raise RunFolderError(f"{root(run)} was trained on synthetic tokens: it has no tokenizer")
  if entry["kind"] == "sentencepiece":
    path = os.path.join(root(run), entry["path"])
    if not os.path.isfile(path):
      raise RunFolderError(f"{path} is missing: the run's tokenizer copy ({RECORD_FILE})")
    if _sha256(path) != entry["sha256"]:
      raise RunFolderError(f"{path} is not the tokenizer the run recorded (sha256 differs): "
                           "corrupt or replaced")
    return load_any_tokenizer(path)
  return load_any_tokenizer(entry["source"], record["model"]["vocab_size"])


def tokenizer_source(run: str) -> str:
  """A path (or preset name) another stage can open the run's tokenizer from; a pretrained
  model (HF directory, .gguf file, preset name) is its own tokenizer's source."""
  if hf_import.is_pretrained_path(pretrained.resolve(run)):
    return run
  entry = read_record(run).get("tokenizer") or {}
  if entry.get("kind") == "sentencepiece":
    return os.path.join(root(run), entry["path"])
  return entry.get("source", "")


# ------------------------------------------------------------------------------------ params


def _load(run: str, kind: str, step: Optional[int], numerics: dict):
  record = read_record(run)
  if record["kind"] != kind:
    raise RunFolderError(f"{root(run)} holds a {record['kind']} model, not a {kind} one")
  config = model_config(run, **numerics)
  # Saved in the record's layout; built in config.scan_layers (a numerics field a caller may
  # change): models/layer_layout.py restacks what differs.
  params = layer_layout.to_layout(ckpt_lib.read_params(checkpoint_dir(run), step),
                                  config.scan_layers)
  if config.lora_rank:  # adapters and heads only: put them on their base and fold them in
    base = layer_layout.to_layout(read_base(run), config.scan_layers)
    params = lora.fold(lora.merge(params, base), config)
    config = lora.folded_config(config)
  return params, config


# ------------------------------------------------------------------------------ LoRA bases


def base_identity(source: str, base_params, placed_as: str = "") -> dict:
  """What a LoRA run's record says of the base it trains on: `source` (a preset name or an
  absolute path), the step of a run folder, and a fingerprint of the values. placed_as:
  '' (the base is the source's params) or 'trunk' (a scalar model's trunk from a policy)."""
  resolved = pretrained.resolve(source)
  if hf_import.is_pretrained_path(resolved):
    name, step = (source if source in pretrained.SHAPES else os.path.abspath(source)), None
  else:
    name, step = root(source), latest_step(source)
  return {"source": name, "step": step, "as": placed_as,
          "fingerprint": lora.fingerprint(base_params)}


def _with_relative_source(base: dict, run: str) -> dict:
  """A base entry with `relative`: its source's path from the run folder (real paths), so a
  workdir moved or mounted elsewhere as a whole still finds its base (`base_source`)."""
  source = str(base.get("source", ""))
  if not os.path.isabs(source):  # a preset name
    return base
  return {**base, "relative": os.path.relpath(os.path.realpath(source), os.path.realpath(run))}


def _base_key(base: Optional[dict]):
  """A base entry without `relative` (records before it lack it, and still resume)."""
  return None if base is None else {k: v for k, v in base.items() if k != "relative"}


def base_source(run: str, entry: dict) -> str:
  """Where a LoRA run's base is: the recorded source, or, when that path is gone, the path the
  record's `relative` leads to from the run folder (the workdir moved). The fingerprint check
  still decides whether what is found there is the base."""
  source = entry["source"]
  relative = entry.get("relative")
  if relative and os.path.isabs(source) and not os.path.exists(source):
    moved = os.path.normpath(os.path.join(os.path.realpath(root(run)), relative))
    if os.path.exists(moved):
      return moved
  return source


def is_trunk_of(run: str, policy_run: str, base_quant: str = "") -> bool:
  """Whether a run is LoRA adapters on the trunk of `policy_run` at its latest step (an RM
  trained on that SFT run), held as `base_quant` ('' float, 'int8'): PPO then keeps one base
  for the RM, critic, policy and reference."""
  record = read_record(run)
  base = record.get("base") or {}
  # Real paths: the same SFT run reached through a symlinked or differently spelt workdir.
  same_run = bool(base.get("source")) and (
      os.path.realpath(base_source(run, base)) == os.path.realpath(root(policy_run)))
  return bool(record["model"].get("lora_rank")) and base.get("as") == "trunk" and (
      same_run and base.get("step") == latest_step(policy_run)
      and record["model"].get("lora_base_quant", "") == base_quant)


def check_base(run: str, base_params) -> None:
  """RunFolderError unless `base_params` are the base a LoRA run's record names (fingerprint)."""
  record = read_record(run)
  entry = record["base"]
  # The fingerprint is of the base in the LoRA run's own layer layout; `base_params` may be in
  # the other (a later stage's choice): restacked first, it is the same base.
  found = lora.fingerprint(layer_layout.to_layout(base_params,
                                                  record["model"].get("scan_layers", False)))
  if found != entry["fingerprint"]:
    raise RunFolderError(f"LoRA run {root(run)} was trained on base {entry['source']} (step "
                         f"{entry.get('step')}, fingerprint {entry['fingerprint']}), but those "
                         f"params now have fingerprint {found}: train it again on them")


def read_base(run: str):
  """The frozen base of a LoRA run, on one device, checked against the record's fingerprint."""
  record = read_record(run)
  entry = record.get("base")
  if not entry:
    raise RunFolderError(f"{os.path.join(root(run), RECORD_FILE)}: a LoRA run without a 'base'")
  source = base_source(run, entry)
  config = model_config(run)
  try:
    resolved = pretrained.resolve(source)
    if hf_import.is_pretrained_path(resolved):
      if entry.get("as"):
        raise RunFolderError(f"a pretrained base placed as {entry['as']!r} is not supported")
      params = hf_import.load_params(hf_import.open_checkpoint(resolved)[1],
                                     lora.folded_config(config), where=resolved)
    else:
      params, _ = load_policy(source, entry.get("step"))
  except (FileNotFoundError, RunFolderError, ValueError) as e:
    also = (f" (nor at {entry['relative']} from the run folder, where a moved workdir keeps "
            "it)" if entry.get("relative") else "")
    raise RunFolderError(f"LoRA run {root(run)}: its base {source} (step {entry.get('step')}) "
                         f"cannot be read{also}: {e}") from None
  if entry.get("as") == "trunk":  # a scalar model's trunk: the policy without its lm_head
    params = {"trunk": trunk_of(params)}
  if config.lora_base_quant:  # the base as the run held it (the fingerprint is of that)
    params = quant.quantize_tree(params, config)
  check_base(run, params)
  return params


def load_policy(run: str, step: Optional[int] = None, **numerics: Any):
  """(params on one device, ModelConfig) of a language-model run: SFT, PPO, KTO, DPO."""
  return _load(run, "policy", step, numerics)


def load_scalar_model(run: str, step: Optional[int] = None, **numerics: Any):
  """(params on one device, ModelConfig) of a reward-model run ({'trunk', 'head'})."""
  return _load(run, "scalar", step, numerics)


def restore_params(source: str, params_like):
  """Params shaped and sharded like `params_like`, from a run folder (or its checkpoints/), or
  from a pretrained model: a Hugging Face directory, a .gguf file or a preset name. How a
  trainer starts from an earlier stage (init_from, sft_dir, rm_dir)."""
  resolved = pretrained.resolve(source)
  if hf_import.is_pretrained_path(resolved):
    return hf_import.load_params_like(resolved, params_like)
  has_record = os.path.exists(os.path.join(root(source), RECORD_FILE))
  record = read_record(source) if has_record else {"model": {}}
  if record["model"].get("lora_rank"):  # a LoRA run: its folded params, placed like the target
    params, _ = (load_policy if record["kind"] == "policy" else load_scalar_model)(source)
    target = nn.unbox(params_like)
    return ckpt_lib.placed_like(layer_layout.like(params, target), target,
                                f"LoRA run {root(source)} (folded)")
  return restore_saved_params(source, params_like)


def restore_base(source: str, params_like, config, read=None):
  """`read(source, like)` (default restore_params) into a LoRA base laid out like
  `params_like`; where that base is int8 (models/quant.py, under `config`, a ModelConfig),
  read in float32 first and quantised onto params_like's shardings."""
  read = read or restore_params
  if not quant.is_quantized(params_like):
    return read(source, params_like)
  params = quant.quantize_tree(read(source, quant.float_like(params_like)), config)
  return ckpt_lib.placed_like(params, nn.unbox(params_like), f"{source} (int8 base)")


def restore_saved_params(source: str, params_like):
  """A run's params as saved (a LoRA run's adapters and heads, unfolded), shaped and sharded
  like `params_like`: restacked first when the run saved its layers in the other layout
  (models/layer_layout.py), a stage's own choice."""
  directory = checkpoint_dir(source)
  saved = ckpt_lib.saved_params_tree(directory)
  if layer_layout.layout_of(saved) in (None, layer_layout.layout_of(params_like)):
    return ckpt_lib.restore_params(directory, params_like)
  log.info("initialised params from %s (layers restacked)", directory)
  return ckpt_lib.placed_like(layer_layout.like(ckpt_lib.read_params(directory), params_like),
                              params_like, f"run {root(source)}")
