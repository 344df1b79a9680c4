r"""Pretraining: next-token prediction on packed English and Chinese text.

  python -m rlhf_jax.main --config=configs/pretrain.py:size=small --workdir=W/pretrain
  python -m rlhf_jax.main --config=configs/pretrain.py:size=tiny,steps=20 --workdir=/tmp/p

Arguments: size (model size, rlhf_jax/models/sizes.py), steps, batch, seq_len, data
(a TFDS name; "synthetic" needs no data at all).
"""
from rlhf_jax.config import util as config_util


def get_config(arg=None):
  arg = config_util.parse_arg(arg, size="small", steps=600, batch=32, seq_len=128,
                              data="rlhf_text")
  config = config_util.base_lm_config(arg)
  config.stage = "pretrain"

  config.data.name = arg.data  # packed text, every token trained on
  config.optim.learning_rate = 3e-3 if arg.size in ("tiny", "small") else 3e-4
  config.optim.warmup_steps = max(arg.steps // 20, 1)
  return config
