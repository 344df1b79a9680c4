r"""KTO: fine-tuning the SFT (or PPO) policy on single answers people liked or disliked.

  python -m rlhf_jax.main --config=configs/kto.py:size=small,init_from=W/sft/checkpoints \
      --workdir=W/kto

Arguments: size, steps (0 = data.epochs passes over the data), batch (answers per step),
seq_len (prompt + answer tokens), data, init_from, beta.

`data` names the feedback: `rlhf_feedback` is the bundled real human ratings (Chit-Chat,
English, about 90% likes); `rlhf_feedback/<config>` an export from the chat front end (in
`data.data_dir`); `rlhf_feedback+rlhf_feedback/<config>` both, read as one shuffled stream.

The loss (rlhf_jax.models.losses.kto_loss; ../shared/REFERENCE.md): implicit reward
r = β·log π/π_ref, reference point β·KL estimated on mismatched (prompt, answer) pairs of the
batch with no gradient through it, a liked answer valued σ(r − z) and a disliked one σ(z − r).
λ_U defaults to the value that makes λ_D·n_D / (λ_U·n_U) = kto.weight_ratio on the training
data (logged); set kto.auto_undesirable_weight=False to use kto.undesirable_weight as given.

The workdir gets checkpoints/ (the policy alone, like SFT's), metrics.jsonl with kto/* (train)
and eval/kto/* (held out, before training and at the end).
"""
import ml_collections

from rlhf_jax.config import util as config_util
from rlhf_jax.config.preference import preference_config


def get_config(arg=None):
  arg = config_util.parse_arg(arg, size="small", steps=0, batch=32, seq_len=256,
                              data="rlhf_feedback", init_from="", beta=0.1)
  config = preference_config(arg, "kto")
  config.kto = ml_collections.ConfigDict(dict(
      beta=arg.beta,
      desirable_weight=1.0,  # λ_D
      undesirable_weight=1.0,  # λ_U, used as given when auto_undesirable_weight is False
      auto_undesirable_weight=True,  # λ_U from the data's like / dislike counts
      weight_ratio=1.0,  # the λ_D·n_D / (λ_U·n_U) aimed at; KTO recommends [1, 4/3]
  ))
  return config
