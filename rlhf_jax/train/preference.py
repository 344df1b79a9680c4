r"""Preference fine-tuning with no reward model: KTO from likes and dislikes, DPO from pairs.

  python -m rlhf_jax.main --config=configs/kto.py:size=small,init_from=W/sft/checkpoints \
      --workdir=W/kto
  python -m rlhf_jax.main --config=configs/dpo.py:size=small,init_from=W/sft/checkpoints,\
data=rlhf_comparisons/round0 --config.data.data_dir=W/tfds --workdir=W/dpo

Two models on one mesh: the policy (trained) and the reference (frozen), both starting from the
same checkpoint -- an SFT run's or a PPO run's (both save the policy alone as `params`). The
model's shape comes from `config.model`; a checkpoint of another shape is a
CheckpointShapeError naming the tensors.

Reference log-probs are computed inside the jitted step, from the frozen params, rather than
precomputed over the data set once: a forward pass without a backward costs about a third of
the policy's update, KTO needs the reference on mismatched (prompt, answer) pairs that only
exist once a batch is drawn, and nothing derived from the data has to be stored, kept in step
with the shuffle, or checkpointed. The step is pure, (state, reference, batch) -> (state,
metrics), jitted with explicit shardings and the state donated; the host loop is the shared
one of trainers/loop.py (progress bar, checkpoints, preemption, NaN stop).

One step, B elements:
  KTO  policy on the B answers (with gradient); policy on the B mismatched pairs, prompt i
       with answer i+1 (no gradient); reference on both (2B rows, one pass); kto_loss.
  DPO  policy on the B chosen and B rejected answers (2B rows, one pass, with gradient);
       reference on the same rows; dpo_loss.

Held out (`eval.split`, before the first step, every `eval.every` steps and at the end):
KTO logs `eval/kto/liked_over_disliked`, the rate at which a held-out liked answer's implicit
reward β·log π/π_ref beats a held-out disliked answer's (over every such pair; ties count one
half), and `eval/kto/logp_liked_over_disliked`, the same with the policy's own log π per answer
token -- the implicit reward is 0 for every answer before training, so only the second says
where the model started. DPO logs the pairwise accuracy of the implicit reward and of log π per
token (`eval/dpo/*`).
"""
from __future__ import annotations

import functools
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
from rlhf_jax.infer import logprobs as logprobs_lib
from rlhf_jax.models import lora, losses
from rlhf_jax.core import optim, sharding
from rlhf_jax.train import inputs as inputs_lib
from rlhf_jax.train import lm as lm_trainer
from rlhf_jax.data import preference_batches as pref_inputs
from rlhf_jax.data import rm_batches as rm_inputs
from rlhf_jax.core.metrics import MetricWriter, read_metrics
from rlhf_jax.data.preference_batches import ROW_KEYS, flat_rows
from rlhf_jax.eval.held_out import PreferenceHeldOut
from rlhf_jax.train.loop import Evaluation, resume, run_train_loop
from rlhf_jax.train.objective import Objective, objective_from_config
from rlhf_jax.train.state import (TrainState, apply_update_if, create_train_state,
                                  dropout_rngs, init_params_fn, load_lora_base, param_count,
                                  setup_mesh)

log = logging.getLogger(__name__)

BATCH_KEYS = ROW_KEYS + ("valid", "label", "lang")


# ---------------------------------------------------------------------------------------------
# The pure step.


def concat_rows(a, b) -> dict:
  return {k: jnp.concatenate([a[k], b[k]], axis=0) for k in ROW_KEYS}


def preference_loss(params, reference, batch, key=None, *, model_config, objective: Objective,
                    reference_config=None):
  """(loss, (metrics, tokens)) of one batch; `reference` gets no gradient. reference_config:
  the reference's model when it differs from the policy's (LoRA: the base, adapters off).
  key: the step's, for the policy's LoRA dropout (None: off; the reference never has any)."""
  logp = functools.partial(logprobs_lib.sequence_logprobs, model_config=model_config,
                           rngs=dropout_rngs(key, model_config))
  ref_logp = functools.partial(logprobs_lib.sequence_logprobs,
                               model_config=reference_config or model_config)
  rows = flat_rows(batch)
  valid = batch["valid"]
  if objective.kind == "kto":
    n_answer = rows["answer_mask"].shape[-1]
    kl_rows = logprobs_lib.mismatched_rows(rows, n_answer)
    b = valid.shape[0]
    ref_all = jax.lax.stop_gradient(
        ref_logp(reference, *logprobs_lib.row_args(concat_rows(rows, kl_rows))))  # [2B]
    kl_policy = jax.lax.stop_gradient(logp(params, *logprobs_lib.row_args(kl_rows)))  # [B]
    policy = logp(params, *logprobs_lib.row_args(rows))  # [B]
    loss, metrics = losses.kto_loss(
        policy, ref_all[:b], kl_policy, ref_all[b:], batch["label"], valid,
        beta=objective.beta, desirable_weight=objective.desirable_weight,
        undesirable_weight=objective.undesirable_weight,
        kl_mask=valid * jnp.roll(valid, -1))
  else:
    ref = jax.lax.stop_gradient(ref_logp(reference, *logprobs_lib.row_args(rows))).reshape(-1, 2)
    policy = logp(params, *logprobs_lib.row_args(rows)).reshape(-1, 2)  # [B, 2]
    loss, metrics = losses.dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], valid,
                                    beta=objective.beta,
                                    label_smoothing=objective.label_smoothing)
  return loss, metrics


def train_step(state: TrainState, reference, batch, *, model_config, tx, schedule,
               objective: Objective):
  """One optimizer update. A batch with no real element (the data spent) or a non-finite loss
  leaves the params and optimizer state as they were, apart from the step counter.

  reference None (LoRA): the reference is the state's frozen base with the adapters off."""
  ref_config = None
  if reference is None:
    reference, ref_config = state.frozen, lora.base_config(model_config)
  grad_fn = jax.value_and_grad(
      lambda p, r, b: preference_loss(state.full_params(p), r, b, state.key(),
                                      model_config=model_config, objective=objective,
                                      reference_config=ref_config),
      has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, reference, batch)
  grad_norm = optax.global_norm(grads)
  count = jnp.sum(batch["valid"])
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state, applied = apply_update_if(finite & (count > 0), tx, grads, state.params,
                                               state.opt_state)
  finite = finite & (applied | (count == 0))  # a batch with nothing to learn is no failure
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  prefix = objective.kind
  out = {f"{prefix}/loss": loss, **{f"{prefix}/{k}": v for k, v in metrics.items()}}
  out.update({"train/grad_norm": grad_norm, "train/lr": schedule(state.step),
              "train/finite": finite, "train/elements": count,
              "train/tokens": jnp.sum((batch["segment_ids"] > 0).astype(jnp.float32))})
  return new_state, out


def make_jitted_step(model_config, tx, schedule, objective, state_shardings, param_shardings,
                     batch_shardings):
  step = functools.partial(train_step, model_config=model_config, tx=tx, schedule=schedule,
                           objective=objective)
  return jax.jit(step, in_shardings=(state_shardings, param_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation.


# ---------------------------------------------------------------------------------------------
# Where the policy starts.


def load_tokenizer(config, workdir: str):
  """config.tokenizer.path, else the init run's tokenizer, else one trained into the workdir."""
  path = config.tokenizer.path
  if not path and config.init_from:
    path = run_folder.tokenizer_source(config.init_from)
    log.info("tokenizer of the init run: %s", path)
  # What inputs.load_tokenizer reads, with the path found (the run's config stays as given).
  view = ml_collections.ConfigDict(dict(
      tokenizer={**config.tokenizer.to_dict(), "path": path}, data={"name": "preference"},
      model=config.model.to_dict()))
  return inputs_lib.load_tokenizer(view, workdir)[0]


def check_init_shapes(init_from: str, abstract_params) -> None:
  """CheckpointShapeError, before anything is compiled, when the init checkpoint's params are
  not the shapes of the model being built (restore_params checks again when it loads)."""
  directory = run_folder.checkpoint_dir(init_from)
  if not os.path.isdir(directory):
    return  # a pretrained model path or a missing directory: restore_params says which
  ckpt = run_folder.reader(init_from)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory} (init_from)")
    ckpt_lib.check_shapes(ckpt.saved_tree(step, "params"), nn.unbox(abstract_params),
                          f"init_from checkpoint {directory} step {step}")
  finally:
    ckpt.close()


def train_state_shardings(init_fn, tx, mesh, rules):
  """Shardings of the TrainState that create_train_state would build (nothing is compiled)."""
  def init(key):
    params = init_fn(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(key))
  return sharding.logical_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, rules)


def state_from_params(params, tx, state_shardings, seed: int) -> TrainState:
  """A step-0 TrainState around a copy of `params` (fresh buffers: the state is donated to
  the step, the reference it came from must stay), with the rng create_train_state draws."""
  def build(p):
    key = jax.random.key(seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(jnp.copy, p),
                      opt_state=tx.init(p), rng=jax.random.key_data(jax.random.fold_in(key, 1)))
  return jax.jit(build, out_shardings=state_shardings)(params)


# ---------------------------------------------------------------------------------------------
# The run.


def check_config(config) -> None:
  if config.trainer not in pref_inputs.KINDS:
    raise ValueError(f"the preference trainer runs {pref_inputs.KINDS}, not {config.trainer!r}")
  if config.optim.grad_accum != 1:
    raise ValueError("optim.grad_accum must be 1 for KTO and DPO: KTO's KL reference point is "
                     "a statistic of the whole batch; raise data.batch_size instead")
  data = config.data
  if data.max_prompt_len < 2 or data.max_answer_len < 1:
    raise ValueError(f"data.max_prompt_len ({data.max_prompt_len}) must be >= 2 and "
                     f"data.max_answer_len ({data.max_answer_len}) >= 1")
  if data.max_prompt_len + data.max_answer_len > config.model.max_len:
    raise ValueError(f"data.max_prompt_len + data.max_answer_len = "
                     f"{data.max_prompt_len + data.max_answer_len} exceeds model.max_len="
                     f"{config.model.max_len}")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) KTO or DPO in `workdir`. Returns the last logged metrics, the last
  held-out metrics, and the held-out metrics before training under eval/<kind>/initial/*."""
  check_config(config)
  kind = config.trainer
  objective_from_config(config)  # bad β or weights fail before any data is read
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = setup_mesh(config)
  data_cfg = config.data

  data, objective = preference_data(config)

  tokenizer = load_tokenizer(config, workdir)
  model = lm_trainer.build_model(config, tokenizer.vocab_size)
  model_config = model.config
  total_steps = config.train.steps or rm_inputs.steps_per_epochs(
      len(data.table), data_cfg.batch_size, jax.process_count(), data_cfg.epochs)
  log.info("%s: %d elements of %s[%s]; %d steps of %d", kind, len(data.table), data_cfg.names,
           data_cfg.split, total_steps, data_cfg.batch_size)
  schedule = optim.make_schedule(config.optim, total_steps)
  tx = optim.make_optimizer(config.optim, total_steps)
  state, state_shardings, reference, extra = starting_state(config, model, tx, mesh, rules)
  log.info("model: %s params, mesh %s", f"{param_count(state.params):,}", dict(mesh.shape))

  encoder = pref_inputs.PreferenceEncoder(tokenizer, kind=kind,
                                          max_prompt_len=data_cfg.max_prompt_len,
                                          max_answer_len=data_cfg.max_answer_len)
  data_iter = pref_inputs.make_batches(
      data, encoder, batch_size=data_cfg.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_epochs=None if config.train.steps else data_cfg.epochs)
  run_folder.write_record(workdir, model_config=model_config, tokenizer=tokenizer, kind="policy",
                          extra=extra)
  ckpt = run_folder.checkpointer(workdir, max_to_keep=config.train.max_to_keep)
  state, _ = resume(ckpt, state, data_iter)

  held_out, initial, evaluations = held_out_setup(config, workdir, tokenizer, objective,
                                                  model_config, state, state_shardings,
                                                  reference, mesh, rules)
  batch_shardings = {k: sharding.batch_sharding(mesh, rules, v.ndim)
                     for k, v in encoder.empty(1).items() if k in BATCH_KEYS}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = make_jitted_step(model_config, tx, schedule, objective, state_shardings,
                              None if reference is None else state_shardings.params,
                              batch_shardings)
    _, last = run_train_loop(
        config, workdir, state, lambda current, batch: jitted(current, reference, batch),
        data_iter, ckpt, functools.partial(make_batch, mesh=mesh, rules=rules),
        total=total_steps, loss_key=f"{kind}/loss",
        summarize=functools.partial(summarize, data=data_iter, kind=kind),
        evaluations=evaluations)
  if held_out is not None:
    log.info("held-out after %d steps: %s", total_steps,
             _brief({k: v for k, v in last.items() if k.startswith("eval/")}))
  out = dict(last)
  out.update({k.replace(f"eval/{kind}/", f"eval/{kind}/initial/"): v for k, v in initial.items()})
  out.update(settings_metrics(objective))
  return out


def preference_data(config):
  """(the training split, the objective): KTO's weights may depend on the like/dislike counts."""
  kind, data_cfg = config.trainer, config.data
  data = pref_inputs.PreferenceData(kind, data_cfg.names, data_cfg.split,
                                    data_cfg.data_dir or None)
  counts = None
  if kind == "kto":
    data.check_feedback()
    counts = data.label_counts()
  return data, objective_from_config(config, counts)


def starting_state(config, model, tx, mesh, rules):
  """(state, its shardings, the frozen reference, the record's extra fields). The reference is
  the starting policy, whatever step a resumed run is at; the policy and its optimizer state are
  built from it (a random init would only be thrown away).

  With LoRA the reference is None: the step reads the state's frozen base (adapters off)."""
  data_cfg = config.data
  init_fn = init_params_fn(model, data_cfg.max_prompt_len + data_cfg.max_answer_len)
  if model.config.lora_rank:
    state, state_shardings = create_train_state(init_fn, tx, mesh, rules, config.seed,
                                                split_lora=True)
    state, extra = load_lora_base(state, config.init_from, model_config=model.config,
                                  tokens_start=config.lora.get("tokens_start", ""))
    return state, state_shardings, None, extra
  if not config.init_from:
    log.warning("no init_from: the policy and the reference start from random params")
    state, state_shardings = create_train_state(init_fn, tx, mesh, rules, config.seed)
    return state, state_shardings, sharding.copy_tree(state.params, state_shardings.params), {}
  check_init_shapes(config.init_from, jax.eval_shape(init_fn, jax.random.key(0)))
  state_shardings = train_state_shardings(init_fn, tx, mesh, rules)
  like = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      nn.unbox(jax.eval_shape(init_fn, jax.random.key(0))),
                      state_shardings.params)
  reference = run_folder.restore_params(config.init_from, like)
  return (state_from_params(reference, tx, state_shardings, config.seed), state_shardings,
          reference, {})


def held_out_setup(config, workdir, tokenizer, objective, model_config, state, state_shardings,
                   reference, mesh, rules):
  """(the held-out evaluator or None, its metrics before training, the loop's evaluations).
  With LoRA (reference None) the evaluator's reference is the base with zero adapters, for the
  policy's model; its log-probs are computed once, here, before the first step donates these
  buffers."""
  held_out = make_held_out(config, tokenizer, objective, model_config, mesh, rules,
                           state_shardings.eval_params())
  eval_reference = reference if reference is not None else lora.zero_adapters(
      state.eval_params())
  initial = initial_metrics(workdir, held_out, eval_reference, objective, int(state.step))
  evaluations = [] if held_out is None else [Evaluation(held_out.bind(eval_reference),
                                                        config.eval.every)]
  return held_out, initial, evaluations


def make_held_out(config, tokenizer, objective, model_config, mesh, rules, param_shardings):
  if not config.eval.split:
    return None
  try:
    return PreferenceHeldOut(config, tokenizer, objective, model_config, mesh, rules,
                             param_shardings)
  except ValueError as e:
    log.warning("no held-out evaluation: %s", e)
    return None


def initial_metrics(workdir: str, held_out, reference, objective, start: int) -> dict:
  """The held-out metrics before training (the policy starts as the reference), written at
  step 0 with the loss settings; a resumed run reads them back from its metrics.jsonl, so its
  summary equals an uninterrupted run's."""
  if start > 0:
    records = [r for r in read_metrics(workdir) if r["step"] == 0]
    prefix = f"eval/{objective.kind}/"
    return {k: v for r in records for k, v in r.items() if k.startswith(prefix)}
  initial = held_out.evaluate(reference, reference) if held_out is not None else {}
  if initial:
    log.info("held-out before training: %s", _brief(initial))
  writer = MetricWriter(workdir)
  writer.drop_after(-1)  # a run started over writes its step 0 again
  writer.write(0, {**initial, **settings_metrics(objective)})
  writer.close()
  return initial


def make_batch(local, *, mesh, rules):
  """The local rows of a batch -> global arrays split over the mesh's batch axes."""
  return sharding.make_global_batch({k: local[k] for k in BATCH_KEYS}, mesh, rules)


def summarize(host, steps, seconds, *, data, kind: str):
  """Throughput over the logging window; NaN metrics of an absent language dropped."""
  host["train/elements_per_s"] = host["train/elements"] * steps / seconds
  host["train/tokens_per_s"] = host["train/tokens"] * steps / seconds
  host.update({f"data/{k}": float(v) for k, v in data.stats.items()})
  host = {k: v for k, v in host.items() if np.isfinite(v) or not k.startswith(kind)}
  return host, {"loss": f"{host[f'{kind}/loss']:.3f}",
                "el_s": f"{host['train/elements_per_s']:.1f}"}


def settings_metrics(objective: Objective) -> dict[str, float]:
  """The loss settings a run used (KTO's λ_U may come from the data), logged at step 0."""
  if objective.kind == "kto":
    return {"kto/beta": objective.beta, "kto/desirable_weight": objective.desirable_weight,
            "kto/undesirable_weight": objective.undesirable_weight}
  return {"dpo/beta": objective.beta, "dpo/label_smoothing": objective.label_smoothing}


def _brief(metrics: dict) -> str:
  return ", ".join(f"{k.split('/', 2)[-1]}={v:.4g}" for k, v in sorted(metrics.items())
                   if "/" not in k.split("/", 2)[-1])
