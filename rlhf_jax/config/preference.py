"""The config both preference objectives share (configs/kto.py, configs/dpo.py build on it).

Light on purpose: config files import it, so it needs ml_collections and config_util only.
"""
import ml_collections

from rlhf_jax.config import util as config_util


def preference_config(arg, trainer: str) -> ml_collections.ConfigDict:
  """`arg` holds size, steps, batch, seq_len, data, init_from and beta (see the config files)."""
  tiny = arg.size == "tiny"
  config = config_util.base_lm_config(arg)
  config.trainer = trainer
  config.stage = trainer
  # A run's checkpoints/ directory (or its workdir): an SFT run's, or a PPO run's, whose
  # checkpoints hold the policy alone. Policy and frozen reference both start from it.
  config.init_from = arg.init_from

  seq_len = min(arg.seq_len, config.model.max_len)
  config.data = ml_collections.ConfigDict(dict(
      names=arg.data,  # one TFDS name, or several joined by '+' and read as one stream
      split="train", data_dir="",
      batch_size=8 if tiny else arg.batch,  # KTO: answers per step; DPO: pairs per step
      # Rows are [left-padded prompt | right-padded answer]; a longer prompt loses its oldest
      # tokens, a longer answer its end (both counted in data/truncated_answers).
      max_prompt_len=seq_len // 2,
      max_answer_len=seq_len - seq_len // 2,
      epochs=1,  # used when train.steps = 0
  ))
  big = arg.size not in ("tiny", "small")
  # KTO wants a learning rate about ten times DPO's (Ethayarajh et al. 2024: 5e-6 vs 5e-7).
  config.optim.learning_rate = {"kto": 5e-6, "dpo": 5e-7}[trainer] if big else 1e-4
  config.optim.warmup_steps = 10
  config.optim.schedule = "linear"
  config.optim.weight_decay = 0.0

  config.train.log_every = max(1, min(10, arg.steps // 10)) if arg.steps else 10
  config.train.checkpoint_every = max(arg.steps // 4, 1) if arg.steps else 200

  config.eval = ml_collections.ConfigDict(dict(
      split="validation",  # '' = no held-out evaluation
      every=0,  # steps between evaluations; 0 = before training and at the end only
      max_examples=0,  # 0 = every held-out element
      batch_size=0,  # 0 = data.batch_size
  ))
  return config
