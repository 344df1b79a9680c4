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

One β for every answer, or one per language (`lang_coefs`, `kl.coef_by_lang`): a policy can
drift further from its reference in one language than in the other on the same β (Gemma 3's
Chinese answers reached twice the English KL, experiments/real_recipe), and the KL budget is a
per-language goal. Each language's β then follows its own answers' KL: the rule above, with KL
and n that language's.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

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
  # One initial β per language, in the run's language order; () = one β (init_coef) for all.
  lang_coefs: tuple[float, ...] = ()

  def __post_init__(self):
    if not self.init_coef >= 0:  # also catches NaN
      raise ValueError(f"the KL coefficient beta must be >= 0, got {self.init_coef}")
    if not all(c >= 0 for c in self.lang_coefs):
      raise ValueError(f"every language's KL coefficient beta must be >= 0, got "
                       f"{self.lang_coefs}")
    if self.adaptive and not self.target > 0:
      raise ValueError(f"the adaptive KL target must be > 0 nats, got {self.target}")
    if self.adaptive and not self.horizon > 0:
      raise ValueError(f"the adaptive KL horizon must be > 0, got {self.horizon}")

  def initial(self) -> Array:
    """β: [] float32, or [L] with one per language."""
    if self.lang_coefs:
      return jnp.asarray(self.lang_coefs, jnp.float32)
    return jnp.asarray(self.init_coef, jnp.float32)

  def update(self, coef, kl, n_steps):
    """The next β after a batch of `n_steps` episodes whose mean per-answer KL was `kl`.
    Elementwise: per-language β [L] takes each language's KL [L] and episodes [L] (a language
    with no episodes in the batch keeps its β)."""
    if not self.adaptive:
      return coef
    error = jnp.clip(kl / self.target - 1.0, -0.2, 0.2)
    return coef * (1.0 + error * n_steps / self.horizon)

  def update_from_rows(self, coef: Array, row_kl: Array, row_lang: Optional[Array]) -> Array:
    """update() from one batch's per-answer KL [B]: with one β the batch mean; with one per
    language ([L], row_lang [B] int: each row's language index), each language's mean."""
    if coef.ndim == 0:
      return self.update(coef, jnp.mean(row_kl), row_kl.shape[0])
    one_hot = jax.nn.one_hot(row_lang, coef.shape[0], dtype=jnp.float32)  # [B, L]
    n = jnp.sum(one_hot, axis=0)  # [L]
    mean_kl = jnp.sum(one_hot * row_kl[:, None], axis=0) / jnp.maximum(n, 1.0)  # [L]
    return self.update(coef, mean_kl, n)


def row_coefs(coef: Array, row_lang: Optional[Array]) -> Array:
  """Each row's β: coef itself when one β [] serves all, else coef[row_lang] [B]."""
  if coef.ndim == 0:
    return coef
  if row_lang is None:
    raise ValueError(f"a per-language beta {coef.shape} needs each row's language index")
  return coef[row_lang]
