"""Small shared builders for tests (not a test module)."""
import jax
import numpy as np

from rlhf_jax.config import util as config_util


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


def write_policy_run(workdir, tokenizer_path, vocab, *, seed=0, step=1, steps=1, size="tiny",
                     scale=0.1, config=None):
  """A run dir as a policy stage (SFT, PPO, KTO) leaves it: checkpoints/<step> holding random
  params of a `size` model and a saved config naming the tokenizer. Returns (params, config).

  `config` entries are merged into the saved config (e.g. a PPO run's `sft_dir`)."""
  import os

  import ppo_setup
  from rlhf_jax.core.checkpoint import Checkpointer
  from rlhf_jax.models import Transformer, model_config
  fields = config_util.model_section(size).to_dict()
  fields["vocab_size"] = vocab
  params = ppo_setup.random_params(Transformer(model_config(size, vocab_size=vocab)), seed,
                                   scale=scale)
  saved = {"model": fields, "tokenizer": {"path": tokenizer_path}, "train": {"steps": steps},
           **(config or {})}
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None, async_save=False)
  ckpt.save(step, params, {"step": np.full((), step, np.int32)}, {}, saved, force=True)
  ckpt.close()
  return params, saved
