"""KL between the policy and the frozen reference: per-token estimators and the coefficient β.

Estimators of KL(π‖π_ref) from tokens sampled from π, with r = log π_ref(x) − log π(x):
  k1 = −r                 unbiased, can be negative per token; what goes into the reward
                          (its expectation over the sampled answer is the sequence KL)
  k3 = (e^r − 1) − r      unbiased and never negative, lower variance; for KL used as a loss

β (the "KL coefficient") is a float32 array everywhere, never a Python float baked into a
trace, so the adaptive controller can change it every iteration without recompiling.

Adaptive controller (Ziegler et al. 2019, lm-human-preferences), with KL the mean per-answer
KL (nats) of the batch and n the number of episodes in it:
  β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array

ESTIMATORS = ("k1", "k3")


def kl_k1(logprobs: Array, ref_logprobs: Array) -> Array:
  """log π − log π_ref per token."""
  return logprobs - ref_logprobs


def kl_k3(logprobs: Array, ref_logprobs: Array) -> Array:
  """(π_ref/π − 1) − log(π_ref/π) per token: ≥ 0 everywhere."""
  r = ref_logprobs - logprobs
  return jnp.expm1(r) - r


def kl_per_token(logprobs: Array, ref_logprobs: Array, estimator: str = "k1") -> Array:
  if estimator == "k1":
    return kl_k1(logprobs, ref_logprobs)
  if estimator == "k3":
    return kl_k3(logprobs, ref_logprobs)
  raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {ESTIMATORS}")


@dataclasses.dataclass(frozen=True)
class KLController:
  """Fixed β (adaptive=False) or the adaptive controller above. Frozen: a static argument.

  `update` is pure and works on Python floats and on arrays alike, inside or outside jit.
  """
  init_coef: float = 0.02
  adaptive: bool = False
  target: float = 6.0
  horizon: float = 10000.0

  def __post_init__(self):
    if not self.init_coef >= 0:  # also catches NaN
      raise ValueError(f"the KL coefficient beta must be >= 0, got {self.init_coef}")
    if self.adaptive and not self.target > 0:
      raise ValueError(f"the adaptive KL target must be > 0 nats, got {self.target}")
    if self.adaptive and not self.horizon > 0:
      raise ValueError(f"the adaptive KL horizon must be > 0, got {self.horizon}")

  def initial(self) -> Array:
    return jnp.asarray(self.init_coef, jnp.float32)

  def update(self, coef, kl, n_steps):
    """The next β after a batch of `n_steps` episodes whose mean per-answer KL was `kl`."""
    if not self.adaptive:
      return coef
    error = jnp.clip(kl / self.target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / self.horizon)
