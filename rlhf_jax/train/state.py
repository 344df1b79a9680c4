"""The train state every trainer carries, and its sharded creation."""
from __future__ import annotations

import logging
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.core import optim, run_folder, sharding
from rlhf_jax.models import lora

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer updates done
  params: Any
  opt_state: Any
  rng: jax.Array  # [2] uint32 key data (plain arrays checkpoint everywhere)
  # LoRA: the frozen base params (models/lora.py), carried but never updated nor saved; `params`
  # then hold only the adapters (and a scalar model's head). None without LoRA.
  frozen: Any = None

  def key(self) -> jax.Array:
    """This step's key: fold the step into the run's key, so a resumed run draws the same."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

  def train_items(self) -> dict:
    """What a checkpoint's 'train' item holds (params are saved on their own)."""
    return {"step": self.step, "opt_state": self.opt_state, "rng": self.rng}

  def full_params(self, params):
    """The model's whole param tree from trainable `params`: with LoRA, merged with the frozen
    base (no copy: the same arrays), else `params` themselves."""
    return params if self.frozen is None else lora.merge(params, self.frozen)

  def checkpoint_params(self):
    """What a checkpoint's 'params' item holds: what a later stage starts from (with LoRA, the
    adapters and heads; the run record names the base)."""
    return self.params

  def restored(self, params, items: dict) -> "TrainState":
    """This state with a checkpoint's params and train items put back."""
    return self.replace(params=params, **items)

  def eval_params(self):
    """The params held-out evaluators look at: the whole model's."""
    return self.full_params(self.params)


def setup_mesh(config, grad_accum: int = 1):
  """(mesh, axis rules) of a run, checking data.batch_size splits over the batch shards (times
  optim.grad_accum micro-batches): one place for every trainer."""
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.axis_rules(config.get("axis_rules"))
  n_shards = sharding.batch_shards(mesh, rules)
  batch_size = config.data.batch_size
  if batch_size % (n_shards * grad_accum):
    raise ValueError(f"data.batch_size={batch_size} must be a multiple of the batch shards "
                     f"({n_shards}) times optim.grad_accum ({grad_accum})")
  return mesh, rules


def create_train_state(init_params_fn, tx: optax.GradientTransformation, mesh, rules, seed: int,
                       split_lora: bool = False):
  """Builds the state straight into its sharded layout (optimizer state included).

  init_params_fn(key) -> boxed params (nn.Partitioned leaves carrying logical axis names); the
  optimizer state inherits the names because optax maps over the boxed leaves.
  split_lora: train the adapters and heads only (lora.split): the optimizer state then covers
  those alone, and the rest goes to `frozen`, to be replaced by the real base.
  Returns (state, state_shardings).
  """

  def init(key):
    params, frozen = init_params_fn(key), None
    if split_lora:
      params, frozen = lora.split(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)), frozen=frozen)

  return sharding.create_sharded(init, mesh, rules, jax.random.key(seed))


def load_lora_base(state, source, placed_as: str = "", base_of=None, model_config=None,
                   tokens_start: str = ""):
  """(state, extra record fields): with LoRA (a `frozen` tree), the base params from `source`
  (init_from: a run folder or a pretrained model) put in as the frozen base, and the record's
  `base` entry naming them; without LoRA, the state as it is and no entry.

  base_of(source, frozen_like) -> base params: how a trainer reads its base when it is not
  simply `source`'s params (an RM's trunk from an SFT policy); an int8 base (lora.base_quant)
  is read in float32 and quantised. A resumed run loads the same
  base again: it is not in the checkpoint (nor are `tokens_start`'s starting rows: a resumed
  run's checkpoint then overwrites them)."""
  if state.frozen is None:
    return state, {}
  if not source:
    raise ValueError("lora.rank > 0 needs init_from: the pretrained or SFT model whose frozen "
                     "params the adapters train on")
  base = run_folder.restore_base(source, state.frozen, model_config, read=base_of)
  identity = run_folder.base_identity(source, base, placed_as)
  log.info("LoRA: %s trainable params on a frozen base of %s (%s)",
           f"{param_count(state.params):,}", f"{param_count(base):,}", identity["source"])
  params = state.params
  if tokens_start:
    starts = lora.parse_token_starts(tokens_start, model_config.lora_tokens)
    params = lora.start_token_rows(params, base, model_config, starts)
    log.info("LoRA: token rows %s start as copies of the base's rows", tokens_start)
  return state.replace(frozen=base, params=params), {"base": identity}


def apply_update_if(ok, tx, grads, params, opt_state):
  """(params, opt_state, applied): one optimizer update when `ok` (a scalar bool), else the
  params and optimizer state unchanged; `applied` is False when skipped or when the updated
  params are not finite.

  The params are checked after the update, not only the loss and gradient: a NaN learning rate
  (or an optimizer that overflows) turns finite gradients into NaN params.

  tx from core/optim (`Skippable`): the update is written in place, and a skipped step is the
  optimizer's own `apply=False`. NaN params are not undone (that would hold a second copy of
  the whole state, 3 GiB at PPO's 135M shape): `applied` is False and the train loop stops
  before it saves or evaluates them (train/loop.py). Any other optax transformation: branches
  on `ok` and on the new params, which keep the old state but make XLA hold the new params and
  moments beside the old ones.
  """
  if isinstance(tx, optim.Skippable):
    updates, opt_state = tx.update(grads, opt_state, params, apply=ok)
    params = jax.tree.map(lambda p, u: p + jnp.where(ok, u, 0).astype(p.dtype), params, updates)
    return params, opt_state, ok & jnp.isfinite(optax.global_norm(params))

  def keep(params, opt_state):
    return params, opt_state, jnp.array(False)

  def update(params, opt_state):
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(optax.global_norm(new_params))
    return jax.lax.cond(finite, lambda: (new_params, new_opt_state, finite),
                        lambda: keep(params, opt_state))

  return jax.lax.cond(ok, update, keep, params, opt_state)


def init_params_fn(model, seq_len: int):
  """key -> boxed params of a Transformer or ScalarModel, traced on a [1, seq_len] row."""
  def init(key):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(key, tokens, tokens, jnp.ones_like(tokens))["params"]
  return init


def dropout_rngs(key, model_config) -> dict:
  """`rngs` for a forward: {'dropout': key} for a training step's key when the model has LoRA
  dropout (it acts only when given a 'dropout' rng, models/lora.py), else none (key None:
  evaluation, sampling and PPO, whose forwards are the deterministic model)."""
  on = key is not None and model_config.lora_rank and model_config.lora_dropout > 0
  return {"dropout": key} if on else {}


def microbatch_keys(key, n: int):
  """n keys [n] for the micro-batches of one step (scanned beside them)."""
  return jax.random.split(key, n)


def split_microbatches(batch, n: int):
  """[B, ...] -> [n, B/n, ...] taking every n-th row, so each device keeps its own rows."""
  def split(x):
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))
