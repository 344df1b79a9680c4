"""The config both preference objectives share (configs/kto.py, configs/dpo.py add their own
section, `kto` or `dpo`, to it).

Light on purpose: config files import it, so it needs ml_collections and the sections only.
"""
import ml_collections

from rlhf_jax.config import sections
from rlhf_jax.config import stage_sections


def preference_config(arg, trainer: str) -> ml_collections.ConfigDict:
  """`arg` holds size, steps, batch, seq_len, data, init_from and beta (see the config files)."""
  config = sections.run_config(trainer, trainer, arg.size)
  # A run's checkpoints/ directory (or its workdir): an SFT run's, or a PPO run's, whose
  # checkpoints hold the policy alone. Policy and frozen reference both start from it.
  config.init_from = arg.init_from
  config.data = stage_sections.preference_data_section(
      arg.data, sections.batch_for(arg.size, arg.batch), min(arg.seq_len, config.model.max_len))
  big = arg.size not in ("tiny", "small")
  # KTO wants a learning rate about ten times DPO's (Ethayarajh et al. 2024: 5e-6 vs 5e-7).
  config.optim = sections.optim_section(
      learning_rate={"kto": 5e-6, "dpo": 5e-7}[trainer] if big else 1e-4, warmup_steps=10,
      schedule="linear", weight_decay=0.0)
  config.train = sections.epochs_train_section(arg.steps)
  config.eval = stage_sections.preference_eval_section()
  return config
