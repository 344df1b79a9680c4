r"""DPO: fine-tuning the SFT (or PPO) policy on pairs of a preferred and a rejected answer.

  python -m rlhf_jax.main --config=configs/dpo.py:size=small,init_from=W/sft/checkpoints \
      --config.data.data_dir=W/tfds --workdir=W/dpo

Arguments: size, steps (0 = data.epochs passes over the pairs), batch (pairs per step),
seq_len (prompt + answer tokens), data, init_from, beta.

`data` names the pairs: `rlhf_comparisons/<config>` gives every (better, worse) pair its
grades or ranking imply -- the comparisons the reward model learns from, so PPO, DPO and KTO
can be compared on the same data; `rlhf_feedback[/<config>]` pairs a liked and a disliked
answer to the same prompt. Several names may be joined by '+'.

Loss (rlhf_jax.models.losses.dpo_loss): −log σ(β[(log π_c − log π_ref,c) − (log π_r − log π_ref,r)]),
with optional label smoothing. The workdir gets checkpoints/ (the policy alone), metrics.jsonl
with dpo/* (train) and eval/dpo/* (held out: pairwise accuracy of the implicit reward).
"""
import ml_collections

from rlhf_jax.config import util as config_util
from rlhf_jax.config.preference import preference_config


def get_config(arg=None):
  arg = config_util.parse_arg(arg, size="small", steps=0, batch=32, seq_len=256,
                              data="rlhf_comparisons/round0", init_from="", beta=0.1)
  config = preference_config(arg, "dpo")
  config.dpo = ml_collections.ConfigDict(dict(
      beta=arg.beta,
      label_smoothing=0.0,  # ε: the fraction of pair labels taken as flipped (0 = plain DPO)
  ))
  return config
