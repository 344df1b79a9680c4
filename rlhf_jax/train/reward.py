"""Reward-model training: rankings of K answers per prompt -> a scalar score per answer.

Each answer goes through the model once; every pair its prompt's ranking or grades imply is
then a difference of two of those K scores (InstructGPT: all C(K,2) pairs of a prompt form one
batch element, which is also cheaper than a forward pass per pair). The loss is chosen by name:

  kwise, grades  Bradley-Terry over all preferred pairs of a prompt, averaged per prompt
                 (whether pairs come from a ranking or grades is the data's business)
  pairwise       every (better, worse) pair its own element, shuffled over the data set,
                 averaged per pair: the "independent pairs" ablation
  binary         pointwise logistic on single answers with a thumb (rlhf_feedback)

`train_step` is pure, (state, batch) -> (state, metrics), jitted with explicit shardings; the
host loop is the shared one of `trainers/loop.py`. After the last step the RM is normalised
(see `rlhf_jax/infer/rm_scores.py`) and `normalization.json` is written next to the checkpoints.
"""
from __future__ import annotations

import functools
import json
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.core import run_folder
from rlhf_jax.core.langs import LANGS
from rlhf_jax.models import losses
from rlhf_jax.core import optim, sharding
from rlhf_jax.models import ModelConfig, Transformer, lora
from rlhf_jax.models.heads import ScalarModel, trunk_of
from rlhf_jax.train import inputs as inputs_lib
from rlhf_jax.data import rm_batches as rm_inputs
from rlhf_jax.data.pipeline import load_source
from rlhf_jax.eval.held_out import RewardModelHeldOut
from rlhf_jax.infer.rm_scores import NORMALIZATION_FILE, comparison_scores
from rlhf_jax.train.loop import Evaluation, resume, run_train_loop
from rlhf_jax.train.state import (TrainState, apply_update_if, create_train_state,
                                  dropout_rngs, init_params_fn, load_lora_base,
                                  microbatch_keys, param_count, setup_mesh, split_microbatches)
from rlhf_jax.infer import answers as respond
from rlhf_jax.infer import rm_scores as reward_lib

log = logging.getLogger(__name__)

# name -> (loss kind, reduction over pairs, data unit)
LOSSES = {
    "kwise": ("ranking", "prompt", "comparison"),
    "grades": ("ranking", "prompt", "comparison"),
    "pairwise": ("ranking", "pair", "pair"),
    "binary": ("binary", None, "comparison"),
}
# The last three: the shared_prompt layout only.
BATCH_KEYS = ("tokens", "positions", "segment_ids", "valid", "prefer", "margin", "label",
              "labeled", "lang", "prefix_ids", "score_at", "answer_mask")


def resolve_loss(name: str, data_name: str) -> str:
  """The loss name; '' picks binary for thumbs (rlhf_feedback) and kwise otherwise."""
  if not name:
    return "binary" if data_name.split("/")[0] == "rlhf_feedback" else "kwise"
  if name not in LOSSES:
    raise ValueError(f"unknown loss.name {name!r}; choose from {sorted(LOSSES)}")
  return name


# ---------------------------------------------------------------------------------------------
# The pure step.


def batch_loss(scores, batch, kind: str, reduction: str | None, rows=None):
  """(loss sum, count) of scores [B, K]; rows [B] restricts it to some prompts."""
  if kind == "binary":
    labeled = batch["labeled"] if rows is None else batch["labeled"] * rows[:, None]
    return losses.binary_feedback_loss(scores, batch["label"], labeled)
  prefer = batch["prefer"] if rows is None else batch["prefer"] * rows[:, None, None]
  return losses.ranking_loss(scores, prefer, batch["valid"], batch["margin"], reduction)


def rm_loss(params, batch, key=None, *, model: ScalarModel, kind: str, reduction: str | None):
  """(loss sum, (count, scores [B, K])); key: the step's, for LoRA dropout (None: off)."""
  scores = comparison_scores(params, batch, model, dropout_rngs(key, model.config))
  loss_sum, count = batch_loss(scores, batch, kind, reduction)
  return loss_sum, (count, scores)


def step_metrics(scores, batch, kind: str, reduction: str | None) -> dict:
  """rm/loss, rm/accuracy, rm/margin (+ pair counts), overall and per language.

  Ranking data: accuracy = preferred answer scored higher; margin = mean r_w - r_l. Thumbs:
  accuracy = sign of the score matches the thumb; margin = mean score signed by the thumb.
  A language with no pair in the batch gets NaN (the host drops it).
  """
  out = {}
  for suffix, rows in [("", None)] + [
      (f"/{lang}", (batch["lang"] == i).astype(jnp.float32))
      for i, lang in enumerate(LANGS)]:
    loss_sum, count = batch_loss(scores, batch, kind, reduction, rows)
    if kind == "binary":
      labeled = batch["labeled"] if rows is None else batch["labeled"] * rows[:, None]
      signed = scores.astype(jnp.float32) * (2.0 * batch["label"] - 1.0)
      correct = jnp.sum(jnp.where(signed > 0, 1.0, jnp.where(signed == 0, 0.5, 0.0)) * labeled)
      n, margin_sum = jnp.sum(labeled), jnp.sum(signed * labeled)
    else:
      prefer = batch["prefer"] if rows is None else batch["prefer"] * rows[:, None, None]
      correct, n, margin_sum = losses.preference_stats(scores, prefer, batch["valid"])
    nan = jnp.float32(jnp.nan)
    out[f"rm/loss{suffix}"] = jnp.where(count > 0, loss_sum / jnp.maximum(count, 1.0),
                                        0.0 if rows is None else nan)
    out[f"rm/accuracy{suffix}"] = jnp.where(n > 0, correct / jnp.maximum(n, 1.0), nan)
    out[f"rm/margin{suffix}"] = jnp.where(n > 0, margin_sum / jnp.maximum(n, 1.0), nan)
    out[f"rm/pairs{suffix}"] = n
  return out


def train_step(state: TrainState, batch, *, model: ScalarModel, tx: optax.GradientTransformation,
               schedule, kind: str, reduction: str | None, grad_accum: int = 1,
               end_on_average_at: int = 0):
  """One optimizer update. The loss is normalised by the count of the whole batch (prompts
  with pairs, or pairs, or thumbs), so accumulation and sharding give one big batch's update.
  A batch with nothing to learn from (data spent) or a non-finite loss leaves the state as it
  was, apart from the step counter.

  end_on_average_at > 0 (with `optim.param_ema` in `tx`): the step that brings the counter to
  this number returns the params' moving average instead of the last iterate, so the run's
  final checkpoint, its held-out metrics and its normalisation are all the average's."""
  # With LoRA, `state.params` are the adapters and the head; the trunk's base comes in frozen.
  grad_fn = jax.value_and_grad(
      lambda p, b, k: rm_loss(state.full_params(p), b, k, model=model, kind=kind,
                              reduction=reduction),
      has_aux=True)
  if grad_accum == 1:
    (loss_sum, (count, scores)), grads = grad_fn(state.params, batch, state.key())
  else:
    def accumulate(carry, micro_and_key):
      (loss_sum, (count, scores)), grads = grad_fn(state.params, *micro_and_key)
      acc_loss, acc_count, acc_grads = carry
      return (acc_loss + loss_sum, acc_count + count,
              jax.tree.map(jnp.add, acc_grads, grads)), scores

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss_sum, count, grads), micro_scores = jax.lax.scan(
        accumulate, (jnp.zeros(()), jnp.zeros(()), zeros),
        (split_microbatches(batch, grad_accum), microbatch_keys(state.key(), grad_accum)))
    scores = micro_scores.swapaxes(0, 1).reshape(-1, micro_scores.shape[-1])  # [B, K]

  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)
  params, opt_state, applied = apply_update_if(finite & (count > 0), tx, grads, state.params,
                                               state.opt_state)
  finite = finite & (applied | (count == 0))  # a batch with nothing to learn is no failure
  if end_on_average_at:
    params = jax.lax.cond(state.step + 1 == end_on_average_at,
                          lambda p: optim.ema_params(opt_state, p), lambda p: p, params)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  metrics = step_metrics(jax.lax.stop_gradient(scores), batch, kind, reduction)
  metrics.update({
      "train/grad_norm": grad_norm, "train/lr": schedule(state.step), "train/finite": finite,
      "train/comparisons": jnp.sum(jnp.max(batch["valid"], axis=1)),
      "train/tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))})
  return new_state, metrics


def make_jitted_step(model, tx, schedule, kind, reduction, grad_accum, state_shardings,
                     batch_shardings, end_on_average_at: int = 0):
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule, kind=kind,
                           reduction=reduction, grad_accum=grad_accum,
                           end_on_average_at=end_on_average_at)
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# Building the model and its initial params.


def build_model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  fields = {k: v for k, v in config.model.to_dict().items() if k != "size"}
  pool = config.get("score_pool", "last")
  if pool == "mean" and config.data.get("layout", "answers") != "shared_prompt":
    raise ValueError("score_pool='mean' averages each answer's own tokens, which only "
                     "data.layout='shared_prompt' marks; got data.layout="
                     f"{config.data.get('layout', 'answers')!r}")
  return ModelConfig(**{**fields, "vocab_size": vocab_size, "score_pool": pool,
                        **lora.model_fields(config.get("lora"))})


def _abstract_policy_params(model_config: ModelConfig, mesh, rules, seq_len: int):
  """ShapeDtypeStructs (with shardings) of a full Transformer's params, lm_head included."""
  model = Transformer(model_config)

  def init(key):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(key, tokens, tokens, jnp.ones_like(tokens))["params"]

  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_shardings(abstract, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(abstract), shardings)


def restore_policy(init_from: str, model_config: ModelConfig, mesh, rules, seq_len: int):
  """The SFT checkpoint's params onto the mesh. A checkpoint of another shape is an error that
  names every tensor and both shapes (checkpoint.check_shapes)."""
  like = _abstract_policy_params(model_config, mesh, rules, seq_len)
  return run_folder.restore_params(init_from, like)




# ---------------------------------------------------------------------------------------------
# Held-out evaluation.


# ---------------------------------------------------------------------------------------------
# Normalisation.


def normalization_sample(config, records: list[dict], rng_seed: int) -> tuple[list, list]:
  """(prompts, answers) whose RM scores the normalisation is fitted on: the SFT policy's own
  answers to training prompts (source 'policy'), or the data's answers (source 'responses',
  for a run with no SFT checkpoint, or data that was sampled from the same SFT)."""
  cfg = config.normalize
  source = cfg.source
  if source == "auto":
    source = "policy" if config.init_from else "responses"
  if source not in ("policy", "responses"):
    raise ValueError(f"unknown normalize.source {cfg.source!r}; choose auto, policy, responses")
  order = np.random.default_rng(rng_seed).permutation(len(records))
  seen, chosen = set(), []
  for i in order:
    if records[i]["prompt"] not in seen:
      seen.add(records[i]["prompt"])
      chosen.append(records[i])
    if len(chosen) == cfg.num_prompts:
      break
  if source == "responses":
    prompts, answers = [], []
    for r in chosen:
      for a in (r.get("responses") or [r.get("response", "")]):
        prompts.append(r["prompt"])
        answers.append(a)
    return prompts, answers, source
  if not config.init_from:
    raise ValueError("normalize.source='policy' needs init_from (the SFT checkpoints)")
  return [r["prompt"] for r in chosen], None, source


def run_normalization(config, workdir, params, model_config, tokenizer, mesh, rules) -> dict:
  """Fits gain and bias on the sample, writes normalization.json (+ the sample, for audits)."""
  cfg = config.normalize
  records = rm_inputs.read_records(config.data.name, config.data.split,
                                   config.data.data_dir or None)
  prompts, answers, source = normalization_sample(config, records, config.seed)
  if answers is None:
    policy = restore_policy(config.init_from, model_config, mesh, rules, config.data.seq_len)
    answers = []
    rng = jax.random.key(config.seed + 7)
    max_prompt = model_config.max_len - cfg.max_new_tokens
    for start in range(0, len(prompts), cfg.batch_size):
      chunk = prompts[start:start + cfg.batch_size]
      padded = chunk + [chunk[-1]] * (cfg.batch_size - len(chunk))  # one compiled shape
      convs = [[{"role": "user", "content": p}] for p in padded]
      # The prompt is cut to leave room for the answer, as respond.answer does.
      out = respond.answer(policy, model_config, tokenizer, convs,
                           rng=jax.random.fold_in(rng, start),
                           max_new_tokens=min(cfg.max_new_tokens, max_prompt),
                           temperature=cfg.temperature, top_p=cfg.top_p)
      answers.extend(out[:len(chunk)])
    del policy
  raw = reward_lib.score_texts(params, model_config, tokenizer, prompts, answers,
                               batch_size=cfg.batch_size, seq_len=config.data.seq_len)
  norm = reward_lib.fit_normalization(raw)
  if jax.process_index() == 0:
    reward_lib.write_normalization(workdir, norm)
    with open(os.path.join(workdir, "normalization_sample.jsonl"), "w", encoding="utf-8") as f:
      for p, a, r in zip(prompts, answers, raw):
        f.write(json.dumps({"prompt": p, "answer": a, "raw": float(r)}, ensure_ascii=False)
                + "\n")
  log.info("normalised on %d %s answers: raw mean %.4f std %.4f -> gain %.4f bias %.4f",
           norm["n"], source, norm["mean_raw"], norm["std_raw"], norm["gain"], norm["bias"])
  return norm


# ---------------------------------------------------------------------------------------------
# The run.


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) a reward model in `workdir`, then normalises it. Returns the last
  logged metrics (plus the held-out and normalisation results)."""
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = setup_mesh(config, config.optim.grad_accum)
  data = config.data
  grad_accum = config.optim.grad_accum
  loss_name = resolve_loss(config.loss.name, data.name)
  kind, reduction, unit = LOSSES[loss_name]

  tokenizer, vocab_size = inputs_lib.load_tokenizer(config, workdir)
  model_config = build_model_config(config, vocab_size)
  if data.seq_len > model_config.max_len:
    raise ValueError(f"data.seq_len={data.seq_len} exceeds model.max_len={model_config.max_len}")
  model = ScalarModel(model_config)

  data_iter, total_steps = make_comparison_batches(config, tokenizer, unit, loss_name)
  schedule = optim.make_schedule(config.optim, total_steps)
  tx = optim.make_optimizer(config.optim, total_steps)
  ema_decay = config.optim.get("ema_decay", 0.0)
  if ema_decay:
    tx = optim.with_param_ema(tx, ema_decay)
  state, state_shardings, ckpt = starting_state(config, workdir, model, tx, tokenizer, data_iter,
                                                mesh, rules)
  start = int(state.step)
  evaluations = held_out_evaluations(config, tokenizer, model, mesh, rules,
                                     state_shardings.eval_params())
  batch_shardings = {k: sharding.batch_sharding(mesh, rules, v.ndim)
                     for k, v in data_iter.encoder.empty(1).items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = make_jitted_step(model, tx, schedule, kind, reduction, grad_accum, state_shardings,
                               batch_shardings, end_on_average_at=total_steps if ema_decay else 0)
    final_state, last = run_train_loop(
        config, workdir, state, step_fn, data_iter, ckpt,
        functools.partial(make_batch, mesh=mesh, rules=rules), total=total_steps,
        loss_key="rm/loss", summarize=functools.partial(summarize, data=data_iter),
        evaluations=evaluations)
  stats = data_iter.stats
  if stats["skipped_no_pairs"] or stats["identical_pairs"]:
    log.warning("reward data: %d comparisons skipped (no pair: all tied or identical answers), "
                "%d pairs between identical answers dropped",
                stats["skipped_no_pairs"], stats["identical_pairs"])
  finished = int(final_state.step) == total_steps and "preempted_at" not in last
  already = start == total_steps and os.path.exists(os.path.join(workdir, NORMALIZATION_FILE))
  if finished and config.normalize.enabled and not already:
    # Outside the logical-rules scope: restoring the policy unboxes abstract params there.
    norm = run_normalization(config, workdir, final_state.eval_params(), model_config,
                             tokenizer, mesh, rules)
    last = {**last, **{f"normalize/{k}": float(v) for k, v in norm.items()}}
  return {**last, **{f"data/{k}": float(v) for k, v in stats.items()}}


def starting_state(config, workdir, model, tx, tokenizer, data_iter, mesh, rules):
  """(state, its shardings, the checkpointer): resumed, or started from the SFT policy's
  trunk. With LoRA that trunk is the frozen base and only the adapters and the head train."""
  model_config, seq_len = model.config, config.data.seq_len
  state, state_shardings = create_train_state(init_params_fn(model, seq_len), tx, mesh, rules,
                                              config.seed, split_lora=bool(model_config.lora_rank))
  log.info("model: %s params, mesh %s", f"{param_count(state.params):,}", dict(mesh.shape))
  state, record_extra = load_lora_base(
      state, config.init_from, placed_as="trunk",
      base_of=lambda source, like: {"trunk": trunk_of(restore_policy(
          source, lora.folded_config(model_config), mesh, rules, seq_len))},
      model_config=model_config, tokens_start=config.lora.get("tokens_start", ""))
  run_folder.write_record(workdir, model_config=model_config, tokenizer=tokenizer, kind="scalar",
                          extra=record_extra)
  ckpt = run_folder.checkpointer(workdir, max_to_keep=config.train.max_to_keep)
  state, start = resume(ckpt, state, data_iter)
  if start is None and config.init_from and state.frozen is None:
    state = state.replace(params=init_from_sft(config, state.params, model_config, mesh, rules))
  return state, state_shardings, ckpt


def make_comparison_batches(config, tokenizer, unit: str, loss_name: str):
  """(the training batches, the number of steps): data.epochs over the table of elements
  (comparisons or independent pairs) unless train.steps says how many."""
  data = config.data
  source = load_source(data.name, data.split, data.data_dir or None)
  table = rm_inputs.element_table(source, unit)
  total_steps = config.train.steps or rm_inputs.steps_per_epochs(
      len(table), data.batch_size, jax.process_count(), data.epochs)
  log.info("reward model: loss %s on %d %ss of %s[%s]; %d steps of %d", loss_name, len(table),
           unit, data.name, data.split, total_steps, data.batch_size)
  # Independent pairs are elements of two answers: no padded slots to pay for.
  max_answers = 2 if unit == "pair" else data.max_answers
  encoder = rm_inputs.encoder_for(data, tokenizer, max_answers=max_answers,
                                 margin=config.loss.margin)
  batches = rm_inputs.ComparisonBatches(
      source, table, encoder, batch_size=data.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_epochs=None if config.train.steps else data.epochs)
  return batches, total_steps


def init_from_sft(config, params, model_config, mesh, rules):
  """The RM's params with its trunk taken from the SFT policy (the head stays as initialised)."""
  policy = restore_policy(config.init_from, model_config, mesh, rules, config.data.seq_len)
  trunk = trunk_of(policy)
  ckpt_lib.check_shapes(trunk, params["trunk"], f"SFT checkpoint {config.init_from}")
  return {"trunk": trunk, "head": params["head"]}


def held_out_evaluations(config, tokenizer, model, mesh, rules, param_shardings) -> list:
  if not config.eval.split:
    return []
  try:
    held_out = RewardModelHeldOut(config, tokenizer, model, mesh, rules, param_shardings)
  except ValueError as e:  # e.g. a small data set whose hashed split came out empty
    log.warning("no held-out evaluation: %s", e)
    return []
  return [Evaluation(held_out, config.eval.every)]


def make_batch(local, *, mesh, rules):
  """The local rows of a batch -> global arrays split over the mesh's batch axes."""
  return sharding.make_global_batch({k: local[k] for k in BATCH_KEYS if k in local}, mesh,
                                    rules)


def summarize(host, steps, seconds, *, data):
  """Throughput over the logging window; a language absent from the batch has no metrics."""
  for lang in LANGS:
    if not host.get(f"rm/pairs/{lang}"):
      for key in [k for k in host if k.endswith(f"/{lang}")]:
        del host[key]
  host["train/comparisons_per_s"] = host["train/comparisons"] * steps / seconds
  host["train/tokens_per_s"] = host["train/tokens"] * steps / seconds
  host.update({f"data/{k}": float(v) for k, v in data.stats.items()})
  return host, {"loss": f"{host['rm/loss']:.3f}", "acc": f"{host.get('rm/accuracy', 0):.2f}",
                "cmp_s": f"{host['train/comparisons_per_s']:.1f}"}
