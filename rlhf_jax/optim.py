"""optax optimisers from `config.optim`: AdamW, warmup + cosine/linear decay, gradient clipping.

`embed_lr_multiplier` gives the token embeddings a larger step. Our embeddings start at N(0, 1),
so an Adam step of lr ~1e-3 moves a row by about a thousandth of its size, and a row moves
mostly on the steps where its token appears. A reward model fine-tuned from a small trunk must learn
what single words are worth (the English gold scorer is a word lexicon), and at 1x its
embeddings hardly move: the demo's tiny RM then trails a bag-of-words model on the same
rankings (experiments/demo_tuning, section 7).

Gradient accumulation lives in the train step (a scan over micro-batches), not in optax, so one
step is always one optimizer update and the step counter means the same thing everywhere.
"""
import jax
import optax


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
