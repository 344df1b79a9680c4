"""Small shared builders for tests (not a test module)."""
import jax
import numpy as np

from rlhf_jax import config_util


def tiny_lm_config(steps=4, batch=8, seq_len=16, vocab=128, **overrides):
  """A tiny next-token config on synthetic data: compiles in seconds, needs no data files."""
  arg = config_util.parse_arg(f"size=tiny,steps={steps},batch={batch},seq_len={seq_len}",
                              size="tiny", steps=steps, batch=batch, seq_len=seq_len, data="")
  config = config_util.base_lm_config(arg)
  config.data.name = "synthetic"
  config.data.batch_size = batch
  config.model.vocab_size = vocab
  config.tokenizer.vocab_size = vocab
  config.train.log_every = 1
  config.train.checkpoint_every = steps
  config.optim.warmup_steps = 1
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def flat_params(tree) -> dict:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}
