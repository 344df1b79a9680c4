r"""Supervised fine-tuning on demonstration dialogues: loss on the assistant's tokens only.

  python -m rlhf_jax.main --config=configs/sft.py:size=small \
      --config.init_from=W/pretrain/checkpoints --workdir=W/sft

Multi-turn conversations are rendered with the chat template (rlhf_jax/text/tokenizer.py) and
packed several to a row; attention never crosses from one conversation into another.
"""
from rlhf_jax.config import util as config_util


def get_config(arg=None):
  arg = config_util.parse_arg(arg, size="small", steps=300, batch=32, seq_len=128,
                              data="rlhf_dialogues")
  config = config_util.base_lm_config(arg)
  config.stage = "sft"

  config.data.name = arg.data  # {messages: [{role, content}]}: assistant turns are trained on
  # The loss reads the assistant's tokens only (28-39% of a batch of the bundled dialogues), so
  # the output projection runs on half the positions, those first (train/lm.py; a batch with
  # more takes every position).
  config.data.loss_capacity = 0.5
  config.init_from = ""  # a pretraining run's checkpoints/ directory
  config.optim.learning_rate = 1e-3 if arg.size in ("tiny", "small") else 2e-5
  config.optim.warmup_steps = max(arg.steps // 20, 1)
  return config
