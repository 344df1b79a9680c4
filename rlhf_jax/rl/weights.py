"""PPO's models filled from their runs: the SFT checkpoint into the policy and the reference,
the reward model's into the frozen RM and the critic (rl/trainer.py builds the empty state
first, `create_models`, then calls these; a resumed run skips `load_trainable`)."""
from __future__ import annotations

import jax

from rlhf_jax.core import run_folder
from rlhf_jax.core.sharding import copy_tree
from rlhf_jax.models import lora
from rlhf_jax.rl import ppo
from rlhf_jax.rl import state as state_lib


def load_frozen(frozen: ppo.Frozen, sources: dict, models: ppo.PPOModels) -> ppo.Frozen:
  """The SFT params into the reference, the RM checkpoint into the reward model (with a shared
  base, its saved adapters and head as they are, on a trunk checked to be the RM's base). An
  int8 base (lora.base_quant) is read in float32 and quantised (run_folder.restore_base)."""
  if sources["sft"]:
    frozen = frozen._replace(reference=run_folder.restore_base(
        sources["sft"], frozen.reference, models.policy))
  if sources["rm"] and sources.get("shared"):
    run_folder.check_base(sources["rm"], ppo.shared_trunk(frozen))
    frozen = frozen._replace(reward=run_folder.restore_saved_params(sources["rm"],
                                                                   frozen.reward))
  elif sources["rm"]:
    frozen = frozen._replace(reward=run_folder.restore_base(sources["rm"], frozen.reward,
                                                            models.reward))
  return frozen


def load_trainable(state: ppo.PPOState, frozen: ppo.Frozen, state_shardings, sources: dict,
                   hyper: ppo.PPOHyper) -> ppo.PPOState:
  """The SFT params into the policy, the RM (normalisation folded in) into the critic. With
  LoRA the adapters start at zero and only the critic's head comes from the RM (its trunk is
  the frozen RM's own). A head-only critic (critic_trunk="frozen") starts as the RM's head."""
  params = state.params
  adapted = lora.count_adapters(params["policy"])  # LoRA: the adapters start at zero
  if sources["sft"] and not adapted:
    params = {**params, "policy": run_folder.restore_params(sources["sft"], params["policy"])}
  fold = jax.jit(state_lib.fold_normalization, out_shardings=state_shardings.params["critic"])
  # The critic starts as the RM: its head alone (a head-only critic, or LoRA on the RM's own
  # trunk), its adapters and head (a shared base), or all of it (full parameters). The first
  # two read the frozen RM's buffers, so they are copied (the state's are donated).
  if hyper.critic_trunk == "frozen" or (adapted and not sources.get("shared")):
    start = {**params["critic"], "head": frozen.reward["head"]}
  elif adapted:
    start = frozen.reward
  else:
    start = run_folder.restore_params(sources["rm"], params["critic"]) if sources["rm"] else None
  if start is not None:
    critic = fold(start, frozen.reward_gain, frozen.reward_bias)
    aliased = hyper.critic_trunk == "frozen" or adapted
    params = {**params, "critic": copy_tree(critic, state_shardings.params["critic"])
              if aliased else critic}
  ema = copy_tree(params["policy"], state_shardings.params["policy"]) if hyper.ema_decay else None
  return state.replace(params=params, ema=ema)
