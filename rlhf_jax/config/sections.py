"""Config sections, one small function each; every stage config (configs/*.py) is assembled
from the sections its trainer reads, so no stage carries a field it never reads.

A value that copies another field (model.vocab_size from tokenizer.vocab_size, the PPO eval's
answer length from the sampler's) is a one-way FieldReference: an override of the source,
`--config.tokenizer.vocab_size=4096` or `config.sampling.max_new_tokens = 64`, reaches every
copy, while an override of the copy changes the copy alone. `to_dict()` resolves them, so the
JSON a checkpoint stores holds plain values.

Light on purpose: config files import it, so it needs ml_collections alone at import time.
"""
from __future__ import annotations

import difflib
import os

import ml_collections

OPTIM_DEFAULTS = dict(learning_rate=1e-3, warmup_steps=10, schedule="cosine", end_lr_fraction=0.1,
                      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0, grad_accum=1,
                      embed_lr_multiplier=1.0)
_PRETRAINED_DEFAULTS = dict(head_dim=0, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False,
                            rope_scaling="", rope_factor=1.0, rope_low_freq_factor=1.0,
                            rope_high_freq_factor=4.0, rope_original_max_len=8192)


def batch_for(size: str, batch: int) -> int:
  """The batch a config file's `batch` argument gives: tiny runs (tests) always take 8."""
  return 8 if size == "tiny" else batch


# ---------------------------------------------------------------------------------------------
# What every trainer reads.


def run_config(trainer: str, stage: str, size: str) -> ml_collections.ConfigDict:
  """The sections every trainer reads: its name, seed, tokenizer, model, mesh and sharding.

  `trainer` picks the host loop (rlhf_jax/train/launch.py); `stage` names the run in metrics.
  """
  config = ml_collections.ConfigDict()
  config.trainer = trainer
  config.stage = stage
  config.seed = 0
  config.tokenizer = tokenizer_section(size)
  config.model = model_section(size, vocab_size=config.tokenizer.get_oneway_ref("vocab_size"))
  config.lora = lora_section()
  config.mesh = mesh_section()
  config.axis_rules = axis_rules_section()
  config.distributed = distributed_section()
  return config


def tokenizer_section(size: str) -> ml_collections.ConfigDict:
  tiny = size == "tiny"
  return ml_collections.ConfigDict(dict(
      path="",  # "" = train one from the bundled text into <workdir>/tokenizer/ on first use
      # Chinese needs ~3.3k single characters at 0.9995 coverage: tiny trades coverage for size
      # (rarer characters fall back to bytes), the others keep room for real merges.
      vocab_size=2048 if tiny else 8192,
      character_coverage=0.995 if tiny else 0.9995))


def model_section(size: str, **overrides) -> ml_collections.ConfigDict:
  """`config.model`: the named size's fields (see rlhf_jax/models/sizes.py) plus overrides."""
  from rlhf_jax.models.sizes import SIZES
  if size not in SIZES:
    close = difflib.get_close_matches(size, list(SIZES), n=3)
    raise ValueError(f"unknown model size {size!r}; known: {sorted(SIZES)}"
                     + (f"; did you mean {close[0]!r}?" if close else ""))
  fields = dict(size=size, vocab_size=8192, n_kv_heads=SIZES[size]["n_heads"], head_dim=0,
                rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False,
                dtype="float32", remat=False, scan_layers=False, vocab_chunk=0)
  fields.update(SIZES[size])
  fields.update(overrides)
  # dtype may also be "auto" (bfloat16 where it measures faster): the trainer resolves it with
  # rlhf_jax/core/dtype_probe.resolve_dtype before building its ModelConfig.
  return ml_collections.ConfigDict(fields)


def pretrained_model_section(model: str, path: str = "", dtype: str = "float32"):
  """(`config.model`, source) of an imported model: a preset of rlhf_jax/models/pretrained.py
  or a Hugging Face directory / .gguf file, whose config.json or header gives the shape.

  `source` is where its weights and tokenizer are (`path` for a shape-only preset). Shared by
  every config that starts from a pretrained model (sft_hf, and reward / ppo with `model=`).
  """
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
  # Scanned layers compile once per model, not once per layer (18 for Gemma 3 270M, 30 for
  # SmolLM2). On a 2-core CPU a LoRA SFT step of Gemma 3 270M takes the same time either way
  # (~27 s) in 0.95 GiB less memory scanned, and decoding is within 7% (benchmarks/RESULTS.md);
  # a stage may still choose unrolled (model.scan_layers: run folders restack on loading).
  # Big vocabularies (Gemma 3's 262k) in chunks of 16k columns: 2.1 GB of float32 logits per
  # 16 x 128 batch otherwise (models/chunked.py); small ones whole.
  section = ml_collections.ConfigDict(dict(
      size=name, **fields, dtype=dtype, remat=fields["d_model"] >= 1024, scan_layers=True,
      vocab_chunk=16384 if fields["vocab_size"] > 65536 else 0))
  return section, path or model


def use_pretrained_model(config, model: str, path: str = "", dtype: str = "float32") -> str:
  """Puts an imported model in `config.model` and points the tokenizer at the model's own,
  whose vocabulary follows the model's. Returns the source (weights and tokenizer)."""
  config.model, source = pretrained_model_section(model, path, dtype)
  config.tokenizer.path = source
  config.tokenizer.vocab_size = config.model.get_oneway_ref("vocab_size")
  return source


def lora_section(rank: int = 0) -> ml_collections.ConfigDict:
  """`config.lora`: low-rank adapters on the projections whose parameter path matches `targets`
  (rank 0: train every parameter). alpha scales the adapter by alpha / rank; dropout acts on
  the adapter's input in the SFT, RM, KTO and DPO steps (a key per step and micro-batch),
  never in evaluation or sampling; PPO refuses it (its ratio needs the sampler's function).
  A scalar model's head (RM, critic) is always fully trained. tokens: comma-separated
  vocabulary ids whose tied embedding rows train beside the adapters ('' none; the pipeline
  sets a pretrained model's chat-template tokens). tokens_start: 'id:source,...', rows of
  `tokens` that start as copies of another token's base row (the pipeline starts Gemma 3
  base's untrained <end_of_turn> from <eos>); a fresh run only, not PPO. base_quant: '' or
  'int8', the targeted projections' frozen kernels stored as int8 with a scale per output
  column (models/quant.py; QLoRA's idea)."""
  return ml_collections.ConfigDict(dict(rank=rank, alpha=16.0, dropout=0.0,
                                        targets=r"(attn/(q|k|v|o)|mlp/(gate|up|down))$",
                                        tokens="", tokens_start="", base_quant=""))


def mesh_section(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """`config.mesh`: device counts per mesh axis; -1 takes the devices the others leave."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def axis_rules_section() -> list:
  """`config.axis_rules`: logical axis -> mesh axes (rlhf_jax/core/sharding.py's defaults)."""
  from rlhf_jax.core.sharding import DEFAULT_AXIS_RULES
  return [list(r) for r in DEFAULT_AXIS_RULES]


def distributed_section() -> ml_collections.ConfigDict:
  """`config.distributed`: multi-host set-up, passed to jax.distributed.initialize.

  On TPU pods and SLURM/Open MPI GPU clusters `initialize=True` alone is enough (JAX finds the
  coordinator itself); elsewhere give the coordinator address and this process's id.
  """
  return ml_collections.ConfigDict(dict(initialize=False, coordinator_address="",
                                        num_processes=0, process_id=-1, local_device_ids=""))


def optim_section(**overrides) -> ml_collections.ConfigDict:
  """`config.optim` (rlhf_jax/core/optim.py): AdamW defaults plus a stage's own choices.

  `ema_decay` is the one field beyond the defaults (the reward trainer's moving average)."""
  unknown = sorted(set(overrides) - set(OPTIM_DEFAULTS) - {"ema_decay"})
  if unknown:
    raise ValueError(f"optim_section: unknown fields {unknown}; known: {sorted(OPTIM_DEFAULTS)}")
  return ml_collections.ConfigDict({**OPTIM_DEFAULTS, **overrides})


def train_section(steps: int, log_every: int | None = None,
                  checkpoint_every: int | None = None) -> ml_collections.ConfigDict:
  """`config.train`: how long, how often to log and checkpoint (defaults from `steps`)."""
  return ml_collections.ConfigDict(dict(
      steps=steps,
      log_every=max(1, min(20, steps // 10)) if log_every is None else log_every,
      checkpoint_every=max(steps // 4, 1) if checkpoint_every is None else checkpoint_every,
      max_to_keep=2,
      stop_after=0))  # > 0: save and stop after this many steps (time-limited jobs); resumable


def epochs_train_section(steps: int) -> ml_collections.ConfigDict:
  """`config.train` of a stage whose `steps` may be 0 (data.epochs passes over the data): the
  intervals cannot come from a step count only the trainer will know."""
  if not steps:
    return train_section(0, log_every=10, checkpoint_every=200)
  return train_section(steps, log_every=max(1, min(10, steps // 10)))


# ---------------------------------------------------------------------------------------------
# Data and sampling.


def text_data_section(name: str, batch_size: int, seq_len: int) -> ml_collections.ConfigDict:
  """`config.data` of next-token training: packed text, or chats with `messages`."""
  return ml_collections.ConfigDict(dict(
      name=name, split="train", data_dir="",  # "" = ~/.cache/rlhf_jax/tfds
      text_field="text",  # for datasets of plain text; records with `messages` are chats
      # 'zh:100': every record whose `lang` is zh appears 100 times per epoch ('' = once each):
      # a language with few records gets a share of the steps (data/pipeline.py).
      lang_repeat="",
      batch_size=batch_size, seq_len=seq_len, pack=True,
      # > 0: the output projection runs on this share of the batch's positions (per shard of
      # the batch axis), the loss positions gathered first; a batch with more loss positions
      # takes every position, exact either way (models/chunked.py). SFT's loss is on the
      # assistant's tokens only.
      loss_capacity=0.0))


def sampling_section(max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> ml_collections.ConfigDict:
  """`config.sampling`: how answers are drawn (rlhf_jax/infer/sampling.py)."""
  return ml_collections.ConfigDict(dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p))
