"""Every problem of a config at once, before any stage runs.

A trainer checks what it needs when it gets there: a negative learning rate or step count
then trains (or does nothing) and exits 0, `data.seq_len=0` dies in model init with a
ZeroDivisionError, and a pipeline with a bad PPO setting trains the tokenizer, pretraining,
SFT, comparisons and the RM for minutes before PPO refuses it. `problems(config)` reads a
stage config (configs/<stage>.py) or the pipeline's (configs/pipeline.py) and returns one line
per problem, "<field> must be ... (got X)"; `validate_or_raise` raises them all in one
ValueError. launch.run calls it for every run, the pipeline once for every stage it will run.

The trainers keep their own checks (the last word, and run on configs built in code); these
are the config's alone. A field a config lacks is not checked (tests build partial configs).
"""
from __future__ import annotations

import math
import os
from typing import Iterable

from rlhf_jax.config.util import parse_by_lang
from rlhf_jax.core.langs import LANGS

SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16", "float16")
# model.dtype also takes "auto": bfloat16 where it measures faster (rlhf_jax/models/dtype_probe.py).
MODEL_DTYPES = DTYPES + ("auto",)
PPO_LANGS = ("both", "en", "zh")
RM_LOSSES = ("", "kwise", "grades", "pairwise", "binary")
RM_LAYOUTS = ("answers", "shared_prompt")  # data/rm_batches.py's LAYOUTS
NORMALIZE_SOURCES = ("auto", "policy", "responses")
KL_ESTIMATORS = ("k1", "k3")
OLD_LOGPROBS = ("auto", "sampler", "recompute")
PPO_OPTIMIZERS = ("joint", "per_model")  # rl/hyper.py OPTIMIZERS
CRITIC_TRUNKS = ("trained", "frozen")  # rl/hyper.py CRITIC_TRUNKS
COMPARISON_LABELS = ("ranking", "grades")
BASE_QUANTS = ("", "int8")  # models/quant.py MODES
# The pipeline's trained stages (sections of configs/pipeline.py); each takes its model's shape
# from config.pretrain.model, so the model fields are checked there once.
PIPELINE_TRAINED = ("pretrain", "sft", "rm", "ppo", "kto", "dpo")
_MISSING = object()


class Checks:
  """Collects the problems of one config; `prefix` ('ppo.') names a pipeline section."""

  def __init__(self, config, prefix: str = "", model: str = "model"):
    self.config, self.prefix, self.found = config, prefix, []
    self.model = model  # where the model's shape is set, for messages ('pretrain.model')

  def name(self, path: str) -> str:
    """The field as the command line overrides it (`--config.<name>=`)."""
    return self.prefix + path

  def get(self, path: str):
    node = self.config
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        return _MISSING
      node = node[part]
    return node

  def problem(self, path: str, what: str, got=_MISSING, alias: str = "") -> None:
    """One line: '<prefix><path> <what> (got X)'; `alias` is the name a reader knows the
    field by ('kl.coef: beta must be >= 0')."""
    line = self.name(path) + (f": {alias}" if alias else "") + f" {what}"
    self.found.append(line + (f" (got {got!r})" if got is not _MISSING else ""))

  def number(self, path: str, lo=None, hi=None, *, lo_open: bool = False,
             hi_open: bool = False, integer: bool = False, alias: str = ""):
    """The field's value if it is a finite number in range, else None (after a problem)."""
    value = self.get(path)
    if value is _MISSING:
      return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        integer and not isinstance(value, int)):
      self.problem(path, f"must be {kind}", value, alias)
      return None
    if not math.isfinite(value):
      self.problem(path, "must be finite", value, alias)
      return None
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    high_bad = hi is not None and (value >= hi if hi_open else value > hi)
    if low_bad or high_bad:
      self.problem(path, "must be " + range_text(lo, hi, lo_open, hi_open), value, alias)
      return None
    return value

  def choice(self, path: str, choices: Iterable[str]):
    value = self.get(path)
    if value is not _MISSING and value not in choices:
      self.problem(path, f"must be one of {list(choices)}", value)
      return None
    return None if value is _MISSING else value

  def existing_path(self, path: str) -> None:
    """A file or directory the run reads; presets (smollm2_135m) and URLs are not checked."""
    value = self.get(path)
    if not value or value is _MISSING or not isinstance(value, str) or "://" in value:
      return
    from rlhf_jax.models import pretrained
    if value not in pretrained.SHAPES and not os.path.exists(value):
      self.problem(path, "does not exist", value)


def range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
  if lo is not None and hi is not None:
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  if lo is not None:
    return f"{'>' if lo_open else '>='} {lo}"
  return f"{'<' if hi_open else '<='} {hi}"


# ---------------------------------------------------------------------------------------------
# Sections every trainer reads.


def check_model(c: Checks, vocab: bool = True):
  """model.*; returns model.max_len when it is valid (for the cross-field checks)."""
  for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff") + (
      ("vocab_size",) if vocab else ()):
    c.number(f"model.{name}", 1, integer=True)
  max_len = c.number("model.max_len", 1, integer=True)
  head_dim = c.number("model.head_dim", 0, integer=True)
  c.number("model.norm_eps", 0, lo_open=True)
  c.number("model.rope_theta", 0, lo_open=True)
  check_numerics(c)
  heads, kv_heads, d_model = (c.get(f"model.{k}") for k in ("n_heads", "n_kv_heads", "d_model"))
  if _positive_ints(heads, kv_heads) and heads % kv_heads:
    c.problem("model.n_kv_heads", f"must divide {c.name('model.n_heads')}={heads}", kv_heads)
  if head_dim == 0 and _positive_ints(heads, d_model) and d_model % heads:
    c.problem("model.d_model", f"must be a multiple of {c.name('model.n_heads')}={heads} "
              f"(or set {c.name('model.head_dim')})", d_model)
  return max_len


def check_numerics(c: Checks) -> None:
  """model.dtype, and model.vocab_chunk (vocabulary columns per step of the chunked losses,
  rlhf_jax/models/chunked.py; 0 = off) where a config has it."""
  c.choice("model.dtype", MODEL_DTYPES)
  c.number("model.vocab_chunk", 0, integer=True)


def check_common(c: Checks) -> None:
  """seed, tokenizer, mesh, optim and train."""
  c.number("seed", integer=True)
  c.number("tokenizer.vocab_size", 1, integer=True)
  c.number("tokenizer.character_coverage", 0, 1, lo_open=True)
  for axis in ("data", "fsdp", "tensor"):
    value = c.number(f"mesh.{axis}", -1, integer=True)
    if value == 0:
      c.problem(f"mesh.{axis}", "must be >= 1, or -1 for the devices the others leave", value)
  c.number("optim.learning_rate", 0)
  c.number("optim.warmup_steps", 0, integer=True)
  c.choice("optim.schedule", SCHEDULES)
  c.number("optim.end_lr_fraction", 0, 1)
  c.number("optim.weight_decay", 0)
  c.number("optim.b1", 0, 1, hi_open=True)
  c.number("optim.b2", 0, 1, hi_open=True)
  c.number("optim.eps", 0, lo_open=True)
  c.number("optim.grad_clip", 0)
  c.number("optim.grad_accum", 1, integer=True)
  c.number("optim.embed_lr_multiplier", 0)
  c.number("optim.ema_decay", 0, 1, hi_open=True)
  c.number("train.steps", 0, integer=True)
  c.number("train.log_every", 1, integer=True)
  c.number("train.checkpoint_every", 0, integer=True)
  c.number("train.max_to_keep", 1, integer=True)
  c.number("train.stop_after", 0, integer=True)
  rank = c.number("lora.rank", 0, integer=True)
  c.number("lora.dropout", 0, 1, hi_open=True)
  if c.choice("lora.base_quant", BASE_QUANTS) and rank == 0:
    c.problem("lora.base_quant", "needs lora.rank > 0 (the int8 base is LoRA's frozen one)",
              c.get("lora.base_quant"))


def check_seq_len(c: Checks, max_len) -> None:
  seq_len = c.number("data.seq_len", 1, integer=True)
  if seq_len and max_len and seq_len > max_len:
    c.problem("data.seq_len", f"must be <= {c.model}.max_len={max_len}", seq_len)


def check_batch(c: Checks, multiple_of: str = "optim.grad_accum") -> None:
  batch = c.number("data.batch_size", 1, integer=True)
  divisor = c.get(multiple_of)
  if batch and _positive_ints(divisor) and batch % divisor:
    c.problem("data.batch_size", f"must be a multiple of {c.name(multiple_of)}={divisor}",
              batch)


def _positive_ints(*values) -> bool:
  return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


# ---------------------------------------------------------------------------------------------
# Per trainer.


def check_lm(c: Checks, max_len) -> None:
  check_batch(c)
  check_seq_len(c, max_len)
  if c.get("data.name") == "":
    c.problem("data.name", "must name a dataset (a TFDS name, or 'synthetic')", "")
  c.number("data.loss_capacity", 0, 1)  # a share of data.seq_len; 0 = off


def check_shared_rows(c: Checks, max_len) -> None:
  """data.row_len of the shared_prompt layout: within the model's positions."""
  row_len = c.number("data.row_len", 2, integer=True)
  if row_len and max_len and row_len > max_len:
    c.problem("data.row_len", f"must be <= {c.model}.max_len={max_len}", row_len)


def check_reward(c: Checks, max_len) -> None:
  check_batch(c)
  check_seq_len(c, max_len)
  c.number("data.max_answers", 2, integer=True)
  c.number("data.epochs", 1, integer=True)
  if c.choice("data.layout", RM_LAYOUTS) == "shared_prompt":
    check_shared_rows(c, max_len)
  c.choice("loss.name", RM_LOSSES)
  c.number("loss.margin", 0)
  c.number("eval.every", 0, integer=True)
  c.number("eval.max_comparisons", 0, integer=True)
  c.number("eval.batch_size", 0, integer=True)
  c.number("eval.bins", 1, integer=True)
  c.choice("normalize.source", NORMALIZE_SOURCES)
  c.number("normalize.num_prompts", 1, integer=True)
  new = c.number("normalize.max_new_tokens", 1, integer=True)
  if new and max_len and new >= max_len:
    c.problem("normalize.max_new_tokens", f"must be < {c.model}.max_len={max_len}", new)
  c.number("normalize.temperature", 0, lo_open=True)
  c.number("normalize.top_p", 0, 1, lo_open=True)
  c.number("normalize.batch_size", 1, integer=True)


def check_sampling(c: Checks, section: str) -> None:
  c.number(f"{section}.max_new_tokens", 1, integer=True)
  c.number(f"{section}.temperature", 0, lo_open=True)
  c.number(f"{section}.top_k", 0, integer=True)
  c.number(f"{section}.top_p", 0, 1, lo_open=True)


def check_ppo(c: Checks, max_len) -> None:
  dropout = c.get("lora.dropout")
  if isinstance(dropout, (int, float)) and dropout > 0:
    c.problem("lora.dropout", "must be 0 for PPO: the ratio compares the policy's log-probs to "
              "the sampler's, which a dropped-out forward would not reproduce", dropout)
  batch = c.number("data.batch_size", 1, integer=True)
  lang = c.choice("data.lang", PPO_LANGS)
  minibatches = c.number("ppo.minibatches", 1, integer=True)
  if batch and minibatches and batch % minibatches:
    c.problem("ppo.minibatches", f"does not divide the batch of {batch} episodes "
              f"({c.name('data.batch_size')})", minibatches)
  if batch and lang == "both" and batch % 2:
    c.problem("data.batch_size", "must be even with data.lang='both' (half per language)",
              batch)
  prompt = c.number("data.max_prompt_len", 1, integer=True)
  check_sampling(c, "sampling")
  check_sampling(c, "eval")
  sampled = c.get("sampling.max_new_tokens")
  for section in ("sampling", "eval"):
    new = c.get(f"{section}.max_new_tokens")
    if section == "eval" and new == sampled:
      continue  # the same length as training's (it follows it): said once
    if prompt and max_len and _positive_ints(new) and prompt + new > max_len:
      c.problem(f"{section}.max_new_tokens", f"+ {c.name('data.max_prompt_len')}={prompt} "
                f"must be <= {c.model}.max_len={max_len}", new)
  c.number("ppo.epochs", 1, integer=True)
  c.number("ppo.clip_eps", 0, 1, lo_open=True, hi_open=True)
  c.number("ppo.value_clip", 0, 1, lo_open=True, hi_open=True)
  for name, hi in (("vf_coef", None), ("ent_coef", None), ("gamma", 1), ("lam", 1)):
    c.number(f"ppo.{name}", 0, hi)
  c.choice("ppo.kl_estimator", KL_ESTIMATORS)
  c.choice("ppo.old_logprobs", OLD_LOGPROBS)
  c.choice("ppo.optimizer", PPO_OPTIMIZERS)
  c.choice("ppo.critic_trunk", CRITIC_TRUNKS)
  c.choice("ppo.loss_mean", ("token", "answer"))  # models/losses.py LOSS_MEANS
  c.number("ppo.missing_eos_penalty")
  c.number("ppo.ema_decay", 0, 1, hi_open=True)
  c.number("kl.coef", 0, alias="beta")
  if lang:
    _check_by_lang(c, "kl.coef_by_lang", LANGS if lang == "both" else (lang,), what="beta")
  c.number("kl.target", 0, lo_open=True)
  c.number("kl.horizon", 0, lo_open=True)
  c.number("ptx.coef", 0)
  c.number("ptx.rows", 1, integer=True)
  ptx_len = c.number("ptx.seq_len", 1, integer=True)
  if ptx_len and max_len and ptx_len > max_len:
    c.problem("ptx.seq_len", f"must be <= {c.model}.max_len={max_len}", ptx_len)
  c.number("eval.every", 0, integer=True)
  c.number("eval.n_prompts", 0, integer=True)
  c.number("train.checkpoint_every", 1, integer=True)  # PPO has no 0 = "at the end only"


def check_preference(c: Checks, max_len) -> None:
  c.number("data.batch_size", 1, integer=True)
  grad_accum = c.get("optim.grad_accum")
  if _positive_ints(grad_accum) and grad_accum != 1:
    c.problem("optim.grad_accum", "must be 1 for KTO and DPO (KTO's reference point is a "
              "statistic of the whole batch): raise data.batch_size instead", grad_accum)
  prompt = c.number("data.max_prompt_len", 2, integer=True)
  answer = c.number("data.max_answer_len", 1, integer=True)
  if prompt and answer and max_len and prompt + answer > max_len:
    c.problem("data.max_answer_len", f"+ {c.name('data.max_prompt_len')}={prompt} must be "
              f"<= {c.model}.max_len={max_len}", answer)
  c.number("data.epochs", 1, integer=True)
  c.number("eval.every", 0, integer=True)
  c.number("eval.max_examples", 0, integer=True)
  c.number("eval.batch_size", 0, integer=True)
  c.number("kto.beta", 0, lo_open=True)
  c.number("kto.desirable_weight", 0, lo_open=True)
  if c.get("kto.auto_undesirable_weight") is False:
    c.number("kto.undesirable_weight", 0, lo_open=True)
  c.number("kto.weight_ratio", 0, lo_open=True)
  c.number("dpo.beta", 0, lo_open=True)
  c.number("dpo.label_smoothing", 0, 0.5, hi_open=True)


TRAINER_CHECKS = {"lm": check_lm, "reward": check_reward, "ppo": check_ppo,
                  "kto": check_preference, "dpo": check_preference}


# ---------------------------------------------------------------------------------------------
# Whole configs.


def stage_problems(config, prefix: str = "", *, max_len=_MISSING,
                   check_paths: bool = True) -> list[str]:
  """A stage config's problems (configs/<stage>.py, or a section of the pipeline's).

  `max_len`: the model length the stage will run with, when its own model section does not
  say (a pipeline section takes the shape of config.pretrain.model, checked there); without
  it the section's model is checked here. `check_paths`: the paths the run reads must exist
  (off for pipeline sections, whose paths the pipeline fills in).
  """
  c = Checks(config, prefix, model="model" if max_len is _MISSING else "pretrain.model")
  trainer = c.get("trainer")
  if trainer not in TRAINER_CHECKS:
    c.problem("trainer", f"must be one of {sorted(TRAINER_CHECKS)}", trainer)
    return c.found
  if max_len is _MISSING:
    max_len = check_model(c)
  else:
    check_numerics(c)  # a stage's own numerics, whatever shape it takes
  check_common(c)
  if trainer == "ppo" and c.get("sft_dir"):
    max_len = None  # the policy's shape is the SFT checkpoint's: the trainer checks it
  TRAINER_CHECKS[trainer](c, max_len)
  if check_paths:
    for path in ("init_from", "tokenizer.path", "sft_dir", "rm_dir"):
      c.existing_path(path)
  return c.found


def _check_by_lang(c: Checks, field: str, langs, **kind) -> None:
  """A per-language field ('zh:0.1'), where the config has it, checked by parse_by_lang."""
  if (text := c.get(field)) is not _MISSING:
    try:
      parse_by_lang(text, field, langs=tuple(langs), **kind)
    except ValueError as e:
      c.problem(field, str(e).removeprefix(f"{field}={text!r}: "))


def check_pipeline_shared(c: Checks, max_len, stages) -> None:
  """The pipeline's own fields and sections: langs, tokenizer, comparisons, evaluate."""
  langs = c.get("langs")
  parts = [p.strip() for p in str(langs).split(",") if p.strip()]
  if not parts or len(set(parts)) != len(parts) or set(parts) - {"en", "zh"}:
    c.problem("langs", "must be 'en,zh', 'en' or 'zh'", langs)
  c.number("seed", integer=True)
  c.number("tokenizer.vocab_size", 1, integer=True)
  c.number("tokenizer.character_coverage", 0, 1, lo_open=True)
  if "tokenizer" in stages:
    c.existing_path("tokenizer.path")
  if "comparisons" in stages:
    for name in ("prompts_per_lang", "rounds", "max_new_tokens", "max_prompt_tokens",
                 "batch_size"):
      c.number(f"comparisons.{name}", 1, integer=True)
    c.number("comparisons.heldout_per_lang", 0, integer=True)
    _check_by_lang(c, "comparisons.prompts_by_lang", parts, what="prompts", integer=True,
                   minimum=1, langs_field="langs")
    c.number("comparisons.k", 2, integer=True)
    c.number("comparisons.temperature", 0, lo_open=True)
    c.number("comparisons.top_p", 0, 1, lo_open=True)
    c.number("comparisons.agreement", 0.5, 1, lo_open=True, hi_open=True)
    c.choice("comparisons.label", COMPARISON_LABELS)
    _check_fits(c, "comparisons.max_new_tokens", "comparisons.max_prompt_tokens", max_len)
  if "evaluate" in stages:
    c.number("evaluate.prompts_per_lang", 1, integer=True)
    c.number("evaluate.max_new_tokens", 1, integer=True)
    c.number("evaluate.temperature", 0, lo_open=True)
    c.number("evaluate.top_p", 0, 1, lo_open=True)
    c.number("evaluate.samples_per_lang", 0, integer=True)
    c.number("evaluate.seed", integer=True)
    _check_fits(c, "evaluate.max_new_tokens", "ppo.data.max_prompt_len", max_len)


def _check_fits(c: Checks, new_path: str, prompt_path: str, max_len) -> None:
  new, prompt = c.get(new_path), c.get(prompt_path)
  if max_len and _positive_ints(new, prompt) and new + prompt > max_len:
    c.problem(new_path, f"+ {prompt_path}={prompt} must be <= pretrain.model.max_len="
              f"{max_len}", new)


def pipeline_problems(config, stages: Iterable[str] | None = None) -> list[str]:
  """configs/pipeline.py's problems, for the stages that will run (all when None).

  Every stage's model has the shape of config.pretrain.model and the vocabulary of
  config.tokenizer, so those are checked once, and the stages' limits are against them.
  """
  stages = set(stages) if stages is not None else set(PIPELINE_TRAINED) | {
      "tokenizer", "comparisons", "evaluate"}
  found, max_len = [], None
  if "pretrain" in config:  # the shape (the vocabulary is config.tokenizer's)
    shape = Checks(config.pretrain, "pretrain.")
    max_len = check_model(shape, vocab=False)
    found += shape.found
  shared = Checks(config)
  check_pipeline_shared(shared, max_len, stages)
  found += shared.found
  for stage in PIPELINE_TRAINED:
    if stage in stages and stage in config:
      found += stage_problems(config[stage], f"{stage}.", max_len=max_len, check_paths=False)
  return found


def is_pipeline(config) -> bool:
  return "comparisons" in config and "pretrain" in config and "trainer" not in config


def problems(config, stages: Iterable[str] | None = None) -> list[str]:
  """Every problem of a stage config or of the pipeline's (see stage_problems and
  pipeline_problems); [] when there is none."""
  if is_pipeline(config):
    return pipeline_problems(config, stages)
  return stage_problems(config)


def format_problems(found: list[str]) -> str:
  return (f"{len(found)} problem{'s' if len(found) > 1 else ''} in the config:\n  "
          + "\n  ".join(found))


def validate_or_raise(config, stages: Iterable[str] | None = None) -> None:
  """One ValueError listing every problem, or nothing."""
  found = problems(config, stages)
  if found:
    raise ValueError(format_problems(found))
