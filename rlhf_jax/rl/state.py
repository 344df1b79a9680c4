"""PPO's state and where its four models' weights live.

The trained state is the policy and the critic (with their optimizer state, EMA, β and rng);
the reference and the reward model are `Frozen`. With LoRA the state holds adapters (and the
critic's head) only and the bases are the frozen models: `full_policy` and `full_critic` put
them together, so no weight is stored twice.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import flax
import jax

from rlhf_jax.models import lora
from rlhf_jax.models.heads import trunk_of
from rlhf_jax.models.transformer import ModelConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PPOModels:
  """Shapes of the models (static). The reference shares the policy's."""
  policy: ModelConfig
  critic: ModelConfig
  reward: ModelConfig


@flax.struct.dataclass
class PPOState:
  step: Array  # [] int32: iterations done
  params: Any  # {'policy': Transformer params, 'critic': ScalarModel params}: trained
  opt_state: Any  # over both (one global-norm clip), or {'policy', 'critic'}: `init_opt_state`
  ema: Any  # EMA of params['policy'], or None when off
  kl_coef: Array  # [] float32: β, or [L]: one per language of the run (kl.coef_by_lang)
  rng: Array  # [2] uint32 key data

  def key(self) -> Array:
    """This iteration's key: a resumed run draws the same answers and minibatches."""
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)

  def checkpoint_params(self):
    """A checkpoint's 'params' item is the policy alone: a later stage starts from it exactly
    as from SFT."""
    return self.params["policy"]

  def train_items(self) -> dict:
    """A checkpoint's 'train' item: the critic, optimizer state, EMA, β, step and rng."""
    items = {"step": self.step, "critic": self.params["critic"], "opt_state": self.opt_state,
             "kl_coef": self.kl_coef, "rng": self.rng}
    if self.ema is not None:
      items["ema"] = self.ema
    return items

  def restored(self, policy, items: dict) -> "PPOState":
    return self.replace(step=items["step"], params={"policy": policy, "critic": items["critic"]},
                        opt_state=items["opt_state"], kl_coef=items["kl_coef"], rng=items["rng"],
                        ema=items.get("ema"))

  def eval_params(self):
    """What held-out evaluation answers with: the EMA of the policy when kept."""
    return self.ema if self.ema is not None else self.params["policy"]


class Frozen(NamedTuple):
  reference: Any  # Transformer params (the SFT policy); with LoRA also the policy's base
  # ScalarModel params; with LoRA its trunk is also the critic's base. With a shared base (the
  # reward model's config has adapters: an RM trained as LoRA on this SFT policy) only its
  # adapters and head: its trunk, and the critic's, is the reference's (`shared_trunk`).
  reward: Any
  reward_gain: Array  # [] float32: normalised score = gain · raw + bias
  reward_bias: Array  # []


def shared_trunk(frozen: Frozen) -> dict:
  """The reference's trunk (all but its vocabulary projection) as a scalar model's base."""
  return {"trunk": trunk_of(frozen.reference)}


def reward_params(frozen: Frozen, reward_config: ModelConfig) -> dict:
  """The reward model's whole params: frozen.reward, or with a shared base (its config has
  adapters) its adapters and head on the reference's trunk."""
  if not reward_config.lora_rank:
    return frozen.reward
  return lora.merge(frozen.reward, shared_trunk(frozen))


def full_policy(policy, frozen: Optional[Frozen], models: PPOModels) -> dict:
  """The policy's whole params: the state's, or with LoRA (models/lora.py) its adapters merged
  onto its base, the reference (the SFT params). No weight is stored twice."""
  if not models.policy.lora_rank:
    return policy
  return lora.merge(policy, frozen.reference)


def full_critic(critic, frozen: Optional[Frozen], models: PPOModels) -> dict:
  """The critic's whole params. With LoRA its adapters and head sit on the reward model's trunk
  (the critic starts from the RM), or on the reference's when the RM is itself adapters on it
  (a shared base: one set of base weights for all four models)."""
  if not models.policy.lora_rank:
    return critic
  trunk = shared_trunk(frozen) if models.reward.lora_rank else {"trunk": frozen.reward["trunk"]}
  return lora.merge(critic, trunk)


def full_params(params, frozen: Optional[Frozen], models: PPOModels) -> dict:
  """The state's {'policy', 'critic'} as whole param trees (`full_policy`, `full_critic`)."""
  return {"policy": full_policy(params["policy"], frozen, models),
          "critic": full_critic(params["critic"], frozen, models)}


def init_opt_state(tx, params, optimizer: str = "joint"):
  """The optimizer state of the state's {'policy', 'critic'} params: one over both ("joint"),
  or one per model ("per_model", PPOHyper.optimizer)."""
  if optimizer == "per_model":
    return {name: tx.init(model_params) for name, model_params in params.items()}
  return tx.init(params)


def fold_normalization(critic, gain, bias):
  """A scalar model whose output is gain · output + bias: the head's kernel and bias scaled
  (the critic starts as the RM with PPO's reward normalisation folded in)."""
  head = critic["head"]["dense"]
  dense = {"kernel": head["kernel"] * gain, "bias": head["bias"] * gain + bias}
  return {**critic, "head": {**critic["head"], "dense": dense}}
