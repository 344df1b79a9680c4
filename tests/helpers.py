"""Small shared builders for tests (not a test module)."""
import jax
import numpy as np

from rlhf_jax.config import util as config_util


def randomize_lora_b(params, seed=1, scale=0.05):
  """Every lora_b drawn N(0, scale) instead of 0: with B = 0 an adapter's A gets no gradient and
  whatever acts on its input (dropout) changes nothing."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = [scale * jax.random.normal(k, x.shape) if str(p[-1].key).endswith("lora_b") else x
         for k, (p, x) in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


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


def write_run(workdir, params, model_config, tokenizer_path, *, kind="policy", step=1,
              saved=None):
  """A run folder as a trainer leaves it: its record (run.json, with the tokenizer copied in
  when one is given) and checkpoints/<step> holding `params` and the saved config."""
  from rlhf_jax.core import run_folder
  from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
  tokenizer = load_any_tokenizer(tokenizer_path) if tokenizer_path else None
  run_folder.write_record(workdir, model_config=model_config, tokenizer=tokenizer, kind=kind)
  ckpt = run_folder.checkpointer(workdir, max_to_keep=None, async_save=False)
  ckpt.save(step, params, {"step": np.full((), step, np.int32)}, {}, saved or {}, force=True)
  ckpt.close()


def write_policy_run(workdir, tokenizer_path, vocab, *, seed=0, step=1, steps=1, size="tiny",
                     scale=0.1, config=None):
  """A run dir as a policy stage (SFT, PPO, KTO) leaves it: its record and checkpoints/<step>
  holding random params of a `size` model. Returns (params, saved config).

  `config` entries are merged into the saved config (e.g. a PPO run's `sft_dir`)."""
  import ppo_setup
  from rlhf_jax.models import Transformer, model_config
  fields = config_util.model_section(size).to_dict()
  fields["vocab_size"] = vocab
  shape = model_config(size, vocab_size=vocab)
  params = ppo_setup.random_params(Transformer(shape), seed, scale=scale)
  saved = {"model": fields, "tokenizer": {"path": tokenizer_path}, "train": {"steps": steps},
           **(config or {})}
  write_run(workdir, params, shape, tokenizer_path, step=step, saved=saved)
  return params, saved
