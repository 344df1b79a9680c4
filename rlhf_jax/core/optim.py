"""optax optimisers from `config.optim`: AdamW, warmup + cosine/linear decay, gradient clipping.

`embed_lr_multiplier` gives the token embeddings a larger step. Our embeddings start at N(0, 1),
so an Adam step of lr ~1e-3 moves a row by about a thousandth of its size, and a row moves
mostly on the steps where its token appears. A reward model fine-tuned from a small trunk must learn
what single words are worth (the English gold scorer is a word lexicon), and at 1x its
embeddings hardly move: the demo's tiny RM then trails a bag-of-words model on the same
rankings (experiments/demo_tuning, section 7).

`param_ema` keeps an exponential moving average of the params in the optimizer state (so
checkpoints and resumes carry it); the reward trainer ends its run on that average
(`ema_decay`, experiments/demo_tuning section 8).

Gradient accumulation lives in the train step (a scan over micro-batches), not in optax, so one
step is always one optimizer update and the step counter means the same thing everywhere.

The clip, Adam and schedule pieces are optax's arithmetic and state trees, written so that XLA
updates params and moments in place and a skipped step (`apply=False`) changes nothing: with
optax's own pieces and a branch on the result, a PPO update at SmolLM2-135M's shape held the
new params and moments beside the old ones (XLA's plan 8.0 -> 6.4 GiB, benchmarks/RESULTS.md
"W4 memory").
"""
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

log = logging.getLogger(__name__)


def make_schedule(optim_config, total_steps: int) -> optax.Schedule:
  lr, warmup = optim_config.learning_rate, int(optim_config.warmup_steps)
  kind = optim_config.schedule
  decay_steps = max(total_steps - warmup, 1)
  end = lr * optim_config.get("end_lr_fraction", 0.1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, end, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"unknown schedule {kind!r}; choose cosine, linear or constant")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _decay_mask(params):
  """Weight decay on matrices only: norms' scales and biases are left alone."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


class Skippable(optax.GradientTransformationExtraArgs):
  """An optax transformation whose `update` takes `apply` (a scalar bool, default True): False
  leaves every piece of its state as it was (train/state.apply_update_if's skipped step, done
  in place). `make_optimizer` and `with_param_ema` make them; any other transformation is
  skipped by a branch that holds a second copy of the state."""


def make_optimizer(optim_config, total_steps: int) -> Skippable:
  """clip -> AdamW (decoupled decay on matrices) -> embedding multiplier, as one optax chain
  (`Skippable`). The state is the tree `optax.adamw` keeps, so checkpoints read either way."""
  warmup = int(optim_config.warmup_steps)
  if total_steps > 0 and 2 * warmup > total_steps:
    # A short run under a preset's warm-up trains mostly below its peak rate (the real recipe's
    # RM once warmed up for 10 of its 12 steps): say so; the config stays the user's.
    log.warning("optim.warmup_steps=%d is over half of this run's %d steps: the learning rate "
                "reaches its peak only at step %d", warmup, total_steps, warmup)
  schedule = make_schedule(optim_config, total_steps)
  parts = []
  if optim_config.grad_clip and optim_config.grad_clip > 0:
    parts.append(_clip_by_global_norm(optim_config.grad_clip))
  parts.append(optax.chain(
      _adam_in_place(optim_config.b1, optim_config.b2, optim_config.eps),
      optax.add_decayed_weights(optim_config.weight_decay, _decay_mask),
      _scale_by_schedule(schedule)))
  multiplier = optim_config.get("embed_lr_multiplier", 1.0)
  if multiplier != 1.0:
    parts.append(optax.masked(optax.scale(multiplier), _embedding_mask))
  return Skippable(*optax.chain(*parts))


def with_param_ema(tx: Skippable, decay: float) -> Skippable:
  """`tx` then `param_ema(decay)`, still `Skippable`."""
  if not isinstance(tx, Skippable):
    raise TypeError(f"with_param_ema needs a Skippable optimizer (make_optimizer), got {tx!r}")
  return Skippable(*optax.chain(tx, param_ema(decay)))


def _clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm as one scalar factor times the gradients. Why: XLA does not
  repeat a division inside each loop that reads its result, so optax's `g / norm * max_norm`
  is stored once more, a whole gradient's size (tests/test_optim.py's one-step plan); a product
  is recomputed where the moments read it."""
  def update(updates, state, params=None):
    del params
    norm = optax.global_norm(updates)
    factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.clip_by_global_norm(max_norm).init, update)


def _adam_in_place(b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_adam's arithmetic and state, written so XLA updates the moments in place.

  Why not optax's own: it derives the update from the moment *expressions*, so XLA fuses the
  moment arithmetic into the update's loop as well, and that loop reads the old moments after
  the moments' own loop has overwritten them; XLA then copies both moments first, every step
  (2 GiB at PPO's 135M shape, policy and critic). Here the new moments pass an optimization
  barrier: the update reads what was stored, and nothing reads the old moments afterwards.
  `apply=False` keeps moments and count (a skipped step)."""
  def update(updates, state, params=None, *, apply=True, **unused):
    del params, unused
    mu = jax.tree.map(lambda g, m: jnp.where(apply, (1 - b1) * g + b1 * m, m), updates, state.mu)
    nu = jax.tree.map(lambda g, v: jnp.where(apply, (1 - b2) * (g * g) + b2 * v, v),
                      updates, state.nu)
    count = jnp.where(apply, optax.safe_increment(state.count), state.count)
    mu, nu = jax.lax.optimization_barrier((mu, nu))
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(optax.scale_by_adam(b1, b2, eps).init, update)


def _scale_by_schedule(schedule) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_learning_rate(schedule) whose step count stays put on a skipped step."""
  def update(updates, state, params=None, *, apply=True, **unused):
    del params, unused
    lr = schedule(state.count)
    out = jax.tree.map(lambda u: -lr * u, updates)
    count = jnp.where(apply, optax.safe_increment(state.count), state.count)
    return out, optax.ScaleByScheduleState(count=count)

  return optax.GradientTransformationExtraArgs(
      optax.scale_by_learning_rate(schedule).init, update)


def _embedding_mask(params):
  """The token-embedding tables ('embed' modules' 'embedding' params; with tied embeddings
  that table is also the output projection)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, "key", None) == "embedding" for k in path), params)


class ParamEmaState(NamedTuple):
  """The average's state: `ema` is biased toward its zero start and `weight` = 1 - decay^n
  after n updates, so ema / weight is the debiased average (Adam's correction)."""
  weight: jax.Array  # [] float32
  ema: Any  # like params


def param_ema(decay: float) -> optax.GradientTransformation:
  """Tracks the exponential moving average of the params *after* each update; the updates pass
  through unchanged, so put it last in a chain. The average starts at zero and is debiased on
  read (`ema_params`): params replaced after `init` (a trunk copied in from an SFT run) leave
  no trace of the random init in it, and n updates with decay d weigh the k-th iterate by
  (1 - d) d^(n-k) / (1 - d^n)."""
  if not 0.0 < decay < 1.0:
    raise ValueError(f"ema_decay={decay} must be in (0, 1), or 0 for no average")

  def init(params):
    return ParamEmaState(weight=jnp.zeros((), jnp.float32),
                         ema=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

  def update(updates, state, params=None, *, apply=True, **unused):
    del unused
    if params is None:
      raise ValueError("param_ema needs the params: tx.update(grads, state, params)")
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(
        lambda e, p: jnp.where(apply, decay * e + (1.0 - decay) * p.astype(jnp.float32), e),
        state.ema, new)
    weight = jnp.where(apply, decay * state.weight + (1.0 - decay), state.weight)
    return updates, ParamEmaState(weight=weight, ema=ema)

  return optax.GradientTransformationExtraArgs(init, update)


def ema_params(opt_state, params):
  """The debiased average `param_ema` keeps somewhere in `opt_state` (a chain's state, or a
  state holding one), in the dtypes of `params`; `params` themselves before the first update.
  A state with no `param_ema` in it is an error."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParamEmaState))
           if isinstance(s, ParamEmaState)]
  if len(found) != 1:
    raise ValueError(f"expected one param_ema state in the optimizer state, found {len(found)}")
  weight, ema = found[0].weight, found[0].ema
  return jax.tree.map(
      lambda e, p: jnp.where(weight > 0, e / jnp.maximum(weight, 1e-30), p).astype(p.dtype),
      ema, params)
