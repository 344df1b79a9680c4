"""PPO's hyperparameters: everything static about the step, checked before anything is compiled.

Frozen and hashable, so the jitted steps of rl/ppo.py bind them with functools.partial; built
from a config by rl/trainer.py `hyper_from_config`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from rlhf_jax.models import losses
from rlhf_jax.rl import kl

OPTIMIZERS = ("joint", "per_model")  # PPOHyper.optimizer
CRITIC_TRUNKS = ("trained", "frozen")  # PPOHyper.critic_trunk


@dataclasses.dataclass(frozen=True)
class PPOHyper:
  """Everything static about the PPO step."""
  epochs: int = 4
  minibatches: int = 4
  clip_eps: float = 0.2  # policy ratio clip
  value_clip: float = 0.2  # value clip, in reward units
  vf_coef: float = 0.1
  ent_coef: float = 0.0
  gamma: float = 1.0
  lam: float = 0.95
  temperature: float = 1.0  # the sampler's: log-probs come from logits / temperature
  kl_estimator: str = "k1"  # in the reward; k3 is available
  whiten_rewards: bool = False  # scale only
  missing_eos_penalty: Optional[float] = -1.0  # score of an answer with no stop token; None: off
  ptx_coef: float = 0.0  # PPO-ptx: γ · pretraining NLL; 0 = off
  ema_decay: float = 0.0  # EMA of the policy; 0 = off
  recompute_old_logprobs: bool = False  # False: the sampler's log-probs are log π_old
  # "joint": one optimizer over policy and critic, one global-norm clip (TRL's PPOTrainer).
  # "per_model": each model its own optimizer state and clip (separate actor and critic
  # optimizers, as OpenRLHF's), the policy's whole update before the critic's, so one model's
  # gradient is held at a time; see rl/ppo.py `update_models_apart`.
  optimizer: str = "joint"
  # "trained": the critic is a whole scalar model (or its LoRA adapters) started from the RM.
  # "frozen": a value head on the reward model's own frozen trunk: one trunk pass per rollout
  # gives the RM's score and every value, and the update trains the head on those features
  # with no pass through a trunk (rl/head_critic.py).
  critic_trunk: str = "trained"
  # The policy loss's mean: over the batch's answer tokens ("token"), or each answer's tokens
  # then the answers ("answer": every episode weighs the same; models/losses.py).
  loss_mean: str = "token"

  def __post_init__(self):
    for name in ("clip_eps", "value_clip"):
      value = getattr(self, name)
      if not 0.0 < value < 1.0:
        raise ValueError(f"ppo.{name} must be in (0, 1), got {value}")
    if self.epochs < 1 or self.minibatches < 1:
      raise ValueError(f"ppo.epochs and ppo.minibatches must be >= 1, got {self.epochs}, "
                       f"{self.minibatches}")
    if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
      raise ValueError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
    if not self.temperature > 0:
      raise ValueError(f"sampling temperature must be > 0, got {self.temperature}")
    if self.kl_estimator not in kl.ESTIMATORS:
      raise ValueError(f"ppo.kl_estimator must be one of {kl.ESTIMATORS}, "
                       f"got {self.kl_estimator!r}")
    if self.vf_coef < 0 or self.ent_coef < 0 or self.ptx_coef < 0:
      raise ValueError("ppo.vf_coef, ppo.ent_coef and ppo.ptx_coef must be >= 0")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ppo.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"ppo.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
    if self.loss_mean not in losses.LOSS_MEANS:
      raise ValueError(f"ppo.loss_mean must be one of {losses.LOSS_MEANS}, "
                       f"got {self.loss_mean!r}")
    if self.critic_trunk not in CRITIC_TRUNKS:
      raise ValueError(f"ppo.critic_trunk must be one of {CRITIC_TRUNKS}, "
                       f"got {self.critic_trunk!r}")

  def check_batch(self, batch_size: int, shards: int = 1) -> None:
    """The minibatches must split the batch evenly, and the batch the mesh's batch shards."""
    if batch_size % self.minibatches:
      raise ValueError(f"ppo.minibatches={self.minibatches} does not divide the batch of "
                       f"{batch_size} episodes")
    if batch_size % shards:
      raise ValueError(f"the batch of {batch_size} episodes does not split over the {shards} "
                       "batch shards of the mesh")
