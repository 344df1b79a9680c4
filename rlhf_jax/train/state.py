"""The train state every trainer carries, and its sharded creation."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.core import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32: optimizer updates done
  params: Any
  opt_state: Any
  rng: jax.Array  # [2] uint32 key data (plain arrays checkpoint everywhere)

  def key(self) -> jax.Array:
    """This step's key: fold the step into the run's key, so a resumed run draws the same."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

  def train_items(self) -> dict:
    """What a checkpoint's 'train' item holds (params are saved on their own)."""
    return {"step": self.step, "opt_state": self.opt_state, "rng": self.rng}


def create_train_state(init_params_fn, tx: optax.GradientTransformation, mesh, rules, seed: int):
  """Builds the state straight into its sharded layout (optimizer state included).

  init_params_fn(key) -> boxed params (nn.Partitioned leaves carrying logical axis names); the
  optimizer state inherits the names because optax maps over the boxed leaves.
  Returns (state, state_shardings).
  """

  def init(key):
    params = init_params_fn(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(key, 1)))

  return sharding.create_sharded(init, mesh, rules, jax.random.key(seed))


def apply_update_if(ok, tx, grads, params, opt_state):
  """(params, opt_state) after one optimizer update when `ok` (a scalar bool), else unchanged.

  A branch rather than a select of the new against the old trees: a select reads and writes
  every parameter and moment once more per step (~5% of a small model's step on a CPU).
  """
  def update(params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.lax.cond(ok, update, lambda params, opt_state: (params, opt_state), params,
                      opt_state)


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))
