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


def make_optimizer(optim_config, total_steps: int) -> optax.GradientTransformation:
  warmup = int(optim_config.warmup_steps)
  if total_steps > 0 and 2 * warmup > total_steps:
    # A short run under a preset's warm-up trains mostly below its peak rate (the real recipe's
    # RM once warmed up for 10 of its 12 steps): say so; the config stays the user's.
    log.warning("optim.warmup_steps=%d is over half of this run's %d steps: the learning rate "
                "reaches its peak only at step %d", warmup, total_steps, warmup)
  schedule = make_schedule(optim_config, total_steps)
  parts = []
  if optim_config.grad_clip and optim_config.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                           eps=optim_config.eps, weight_decay=optim_config.weight_decay,
                           mask=_decay_mask))
  multiplier = optim_config.get("embed_lr_multiplier", 1.0)
  if multiplier != 1.0:
    parts.append(optax.masked(optax.scale(multiplier), _embedding_mask))
  return optax.chain(*parts)


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

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("param_ema needs the params: tx.update(grads, state, params)")
    new = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32),
                       state.ema, new)
    return updates, ParamEmaState(weight=decay * state.weight + (1.0 - decay), ema=ema)

  return optax.GradientTransformation(init, update)


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
