"""Next-token training: pretraining and SFT are the same step, with a different loss mask.

Pretraining trains on every token of packed text; SFT packs rendered dialogues and trains only
on the assistant's tokens (the tokenizer's chat template makes the mask). Packed examples keep
their attention inside the example through segment ids.

`train_step` is a pure function  (state, batch) -> (state, metrics), jitted once with explicit
shardings; `train` is the host loop around it: data, checkpoints, metrics, progress.
"""
from __future__ import annotations

import functools
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from rlhf_jax.core import run_folder
from rlhf_jax.models import chunked
from rlhf_jax.core import optim, sharding
from rlhf_jax.models import ModelConfig, Transformer, lora
from rlhf_jax.train import inputs as inputs_lib
from rlhf_jax.train.loop import resume, run_train_loop
from rlhf_jax.train.state import (TrainState, apply_update_if, create_train_state,
                                  dropout_rngs, init_params_fn, load_lora_base,
                                  microbatch_keys, param_count, setup_mesh, split_microbatches)

log = logging.getLogger(__name__)

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def lm_loss(params, batch, model: Transformer, loss_share: float = 0.0, groups: int = 1,
            key=None):
  """(summed next-token loss, (number of trained tokens, 1.0 where the output projection ran
  on the gathered loss positions only)) of one batch. Over vocabulary chunks when
  model.config.vocab_chunk > 0 (models/chunked.py), else from the whole logits; on
  `loss_share` of the positions, the loss positions first, when > 0 (data.loss_capacity).
  key: the step's key, for LoRA dropout (None: the deterministic model)."""
  hidden, _ = model.apply({"params": params}, batch["inputs"], batch["positions"],
                          batch["segment_ids"], method=Transformer.hidden_states,
                          rngs=dropout_rngs(key, model.config))  # [B, T, D]
  loss, count, gathered = chunked.gathered_next_token_loss(
      params, hidden, batch["targets"], batch["loss_mask"], model_config=model.config,
      loss_share=loss_share, groups=groups)
  return loss, (count, gathered)


def train_step(state: TrainState, batch, *, model: Transformer, tx: optax.GradientTransformation,
               schedule, grad_accum: int = 1, loss_share: float = 0.0, groups: int = 1):
  """One optimizer update on a global batch, accumulated over `grad_accum` micro-batches.

  The loss is normalised by the trained-token count of the whole batch, so any accumulation or
  sharding gives the same update as one big batch. A non-finite loss or gradient leaves the
  state as it was (the host loop then stops and reports the step).
  """
  # With LoRA, `state.params` are the adapters and the base comes in frozen: no gradient of it.
  grad_fn = jax.value_and_grad(
      lambda p, b, k: lm_loss(state.full_params(p), b, model, loss_share, groups, k),
      has_aux=True)

  if grad_accum == 1:
    (loss_sum, (count, gathered)), grads = grad_fn(state.params, batch, state.key())
  else:
    def accumulate(carry, micro_and_key):
      (loss_sum, (count, gathered)), grads = grad_fn(state.params, *micro_and_key)
      acc_loss, acc_count, acc_gathered, acc_grads = carry
      return (acc_loss + loss_sum, acc_count + count, acc_gathered + gathered / grad_accum,
              jax.tree.map(jnp.add, acc_grads, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss_sum, count, gathered, grads), _ = jax.lax.scan(
        accumulate, (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), zeros),
        (split_microbatches(batch, grad_accum), microbatch_keys(state.key(), grad_accum)))

  denom = jnp.maximum(count, 1.0)
  loss = loss_sum / denom
  grads = jax.tree.map(lambda g: g / denom, grads)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state, applied = apply_update_if(finite, tx, grads, state.params, state.opt_state)
  finite = finite & applied
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/tokens": count,
             "train/lr": schedule(state.step), "train/finite": finite}
  if loss_share:  # the share of (micro-)batches whose loss positions fit data.loss_capacity
    metrics["train/loss_gathered"] = gathered
  return new_state, metrics


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> Transformer:
  model_fields = {k: v for k, v in config.model.to_dict().items() if k != "size"}
  return Transformer(ModelConfig(**{**model_fields, "vocab_size": vocab_size,
                                    **lora.model_fields(config.get("lora"))}))


def make_jitted_step(model, tx, schedule, grad_accum, state_shardings, batch_sharding,
                     loss_share: float = 0.0, groups: int = 1):
  step = functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                           grad_accum=grad_accum, loss_share=loss_share, groups=groups)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) next-token training in `workdir`. Returns the last logged metrics."""
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = setup_mesh(config, config.optim.grad_accum)
  grad_accum = config.optim.grad_accum

  tokenizer, vocab_size = inputs_lib.load_tokenizer(config, workdir)
  model = build_model(config, vocab_size)
  if config.data.seq_len > model.config.max_len:
    raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_len="
                     f"{model.config.max_len}")
  total_steps = config.train.steps
  schedule = optim.make_schedule(config.optim, total_steps)
  tx = optim.make_optimizer(config.optim, total_steps)

  state, state_shardings = create_train_state(
      init_params_fn(model, config.data.seq_len), tx, mesh, rules, config.seed,
      split_lora=bool(model.config.lora_rank))
  log.info("model: %s params, mesh %s", f"{param_count(state.params):,}", dict(mesh.shape))
  state, record_extra = load_lora_base(
      state, config.get("init_from"), model_config=model.config,
      tokens_start=(config.get("lora") or {}).get("tokens_start", ""))

  data_iter = inputs_lib.make_lm_inputs(config, tokenizer, jax.process_index(),
                                        jax.process_count())
  run_folder.write_record(workdir, model_config=model.config, tokenizer=tokenizer, kind="policy",
                          extra=record_extra)
  ckpt = run_folder.checkpointer(workdir, max_to_keep=config.train.max_to_keep)
  state, start = resume(ckpt, state, data_iter)
  if start is None and config.get("init_from") and state.frozen is None:
    state = state.replace(params=run_folder.restore_params(config.init_from, state.params))

  batch_shard = sharding.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = make_jitted_step(model, tx, schedule, grad_accum, state_shardings, batch_shard,
                               config.data.get("loss_capacity", 0.0),
                               sharding.batch_shards(mesh, rules))
    _, last = run_train_loop(config, workdir, state, step_fn, data_iter, ckpt,
                             functools.partial(make_batch, mesh=mesh, rules=rules),
                             total=total_steps, summarize=functools.partial(summarize,
                                                                            data=data_iter))
  return last


def make_batch(local, *, mesh, rules):
  """The local rows of a batch -> global arrays split over the mesh's batch axes."""
  return sharding.make_global_batch({k: local[k] for k in BATCH_KEYS}, mesh, rules)


def summarize(host, steps, seconds, *, data):
  """Tokens per second over the logging window, and what the data pipeline truncated."""
  # Tokens of the last step times the steps in the window: batches are of fixed shape.
  host["train/tokens_per_s"] = host["train/tokens"] * steps / seconds
  stats = getattr(data, "stats", None)
  if stats:
    host.update({f"data/{k}": float(stats[k]) for k in ("examples", "truncated") if k in stats})
  return host, {"loss": f"{host['train/loss']:.3f}",
                "tok_s": f"{host['train/tokens_per_s']:.0f}"}
