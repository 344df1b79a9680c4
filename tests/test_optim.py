"""core/optim.make_optimizer and train/state.apply_update_if: AdamW as optax and a numpy loop
compute it, a skipped step that changes nothing, and moments updated in place."""
import ml_collections
import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from rlhf_jax.core import optim
from rlhf_jax.train.state import apply_update_if


def optim_config(**overrides):
  c = ml_collections.ConfigDict(dict(
      learning_rate=3e-2, warmup_steps=2, schedule="cosine", end_lr_fraction=0.1, b1=0.9,
      b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, embed_lr_multiplier=1.0))
  c.update(overrides)
  return c


def draw(rng, like):
  return jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), like)


PARAMS = {"dense": {"kernel": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)},
          "norm": {"scale": np.ones(4, np.float32)}}


def numpy_adamw(params, grads_seq, c, steps):
  """AdamW by hand: clip by global norm, bias-corrected moments, decay on matrices only, the
  warm-up + cosine schedule read at the step count before the update (optax's convention)."""
  schedule = optim.make_schedule(c, steps)
  p = {k: np.asarray(v, np.float64) for k, v in flat(params).items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: np.asarray(x, np.float64) for k, x in flat(grads).items()}
    norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
    g = {k: x * min(1.0, c.grad_clip / norm) for k, x in g.items()}
    lr = float(schedule(t - 1))
    for k in p:
      m[k] = c.b1 * m[k] + (1 - c.b1) * g[k]
      v[k] = c.b2 * v[k] + (1 - c.b2) * g[k] ** 2
      step = (m[k] / (1 - c.b1 ** t)) / (np.sqrt(v[k] / (1 - c.b2 ** t)) + c.eps)
      if p[k].ndim >= 2:
        step = step + c.weight_decay * p[k]
      p[k] = p[k] - lr * step
  return p


def flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_updates_equal_optax_adamw_and_a_numpy_loop():
  c = optim_config()
  rng = np.random.default_rng(0)
  grads_seq = [draw(rng, PARAMS) for _ in range(5)]
  tx = optim.make_optimizer(c, 5)
  reference = optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adamw(
      optim.make_schedule(c, 5), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))
  state, ref_state = tx.init(PARAMS), reference.init(PARAMS)
  # The state is optax.adamw's tree: a checkpoint of either reads into the other.
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  params = ref_params = PARAMS
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = reference.update(grads, ref_state, ref_params)
    params, ref_params = optax.apply_updates(params, updates), optax.apply_updates(
        ref_params, ref_updates)
  by_hand = numpy_adamw(PARAMS, grads_seq, c, 5)
  for name, value in flat(params).items():
    np.testing.assert_allclose(value, flat(ref_params)[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(value, by_hand[name], rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("ema", [False, True])
def test_a_skipped_step_changes_nothing_and_the_next_one_is_the_first(ema):
  """apply_update_if with ok=False and NaN gradients: params and every piece of optimizer
  state (moments, counts, schedule step, the param average) bit-identical; the next real step
  is what the first would have been without the skip."""
  c = optim_config()
  tx = optim.make_optimizer(c, 5)
  if ema:
    tx = optim.with_param_ema(tx, 0.9)
  assert isinstance(tx, optim.Skippable)
  grads = draw(np.random.default_rng(1), PARAMS)
  nan_grads = jax.tree.map(lambda g: np.full_like(g, np.nan), grads)
  state = tx.init(PARAMS)
  step = jax.jit(lambda ok, g, p, s: apply_update_if(ok, tx, g, p, s))
  params, skipped_state, applied = step(jnp.array(False), nan_grads, PARAMS, state)
  assert not bool(applied)
  for x, y in zip(jax.tree.leaves((params, skipped_state)), jax.tree.leaves((PARAMS, state))):
    np.testing.assert_array_equal(x, y)
  after_skip = step(jnp.array(True), grads, params, skipped_state)
  direct = step(jnp.array(True), grads, PARAMS, state)
  assert bool(after_skip[2]) and bool(direct[2])
  for x, y in zip(jax.tree.leaves(after_skip[:2]), jax.tree.leaves(direct[:2])):
    np.testing.assert_array_equal(x, y)


def test_any_other_optax_transformation_is_skipped_by_branches():
  """A plain optax chain knows nothing of `apply`: apply_update_if keeps its state by branches
  (a step with NaN gradients changes nothing) and applies it as optax would otherwise."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
  grads = draw(np.random.default_rng(3), PARAMS)
  state = tx.init(PARAMS)
  nan_grads = jax.tree.map(lambda g: np.full_like(g, np.nan), grads)
  params, kept, applied = apply_update_if(jnp.array(False), tx, nan_grads, PARAMS, state)
  assert not bool(applied)
  for x, y in zip(jax.tree.leaves((params, kept)), jax.tree.leaves((PARAMS, state))):
    np.testing.assert_array_equal(x, y)
  params, _, applied = apply_update_if(jnp.array(True), tx, grads, PARAMS, state)
  want = optax.apply_updates(PARAMS, tx.update(grads, state, PARAMS)[0])
  assert bool(applied)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  with pytest.raises(TypeError, match="Skippable"):
    optim.with_param_ema(tx, 0.9)


def test_a_nan_learning_rate_is_reported_as_not_applied():
  tx = optim.make_optimizer(optim_config(learning_rate=float("nan")), 5)
  grads = draw(np.random.default_rng(2), PARAMS)
  _, _, applied = apply_update_if(jnp.array(True), tx, grads, PARAMS, tx.init(PARAMS))
  assert not bool(applied)


def test_the_update_writes_params_and_moments_in_place():
  """XLA's plan of one donated step over two 64k-element leaves (256 KiB each): no temporary
  of a leaf's size. The step as it was written before (a cond on the new params' norm, optax's
  moments fused into the update, optax's clip) held the new params and moments beside the old
  ones: 6 leaves; with only optax's clip, the clipped gradients: 2."""
  tx = optim.make_optimizer(optim_config(), 5)
  params = {"w": jnp.zeros((256, 256)), "v": jnp.zeros((256, 256))}
  state = tx.init(params)

  def step(params, state, grads):
    ok = jnp.isfinite(optax.global_norm(grads))
    return apply_update_if(ok, tx, grads, params, state)[:2]
  stats = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile(
      ).memory_analysis()
  leaf = 256 * 256 * 4
  assert stats.alias_size_in_bytes >= 6 * leaf  # params and both moments written in place
  assert stats.temp_size_in_bytes < leaf, stats.temp_size_in_bytes / leaf
