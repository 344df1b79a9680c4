"""Which preference loss a KTO / DPO run optimises, and its settings (train/preference.py)."""
from __future__ import annotations

import dataclasses
import logging

from rlhf_jax.data import preference_batches as pref_inputs

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Objective:
  """Which loss, and its settings (hashable: it is bound into the jitted step)."""
  kind: str  # "kto" | "dpo"
  beta: float
  desirable_weight: float = 1.0  # KTO
  undesirable_weight: float = 1.0  # KTO
  label_smoothing: float = 0.0  # DPO

  def __post_init__(self):
    if self.kind not in pref_inputs.KINDS:
      raise ValueError(f"unknown preference objective {self.kind!r}; choose from "
                       f"{pref_inputs.KINDS}")
    if not self.beta > 0:
      raise ValueError(f"{self.kind}.beta must be > 0, got {self.beta}")
    if self.kind == "kto" and not (self.desirable_weight > 0 and self.undesirable_weight > 0):
      raise ValueError(f"kto.desirable_weight and kto.undesirable_weight must be > 0, got "
                       f"{self.desirable_weight} and {self.undesirable_weight}")
    if not 0.0 <= self.label_smoothing < 0.5:
      raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def objective_from_config(config, label_counts: tuple[int, int] | None = None) -> Objective:
  """The objective of `config.trainer`; for KTO with `kto.auto_undesirable_weight` λ_U is set
  from the data's like / dislike counts so that λ_D·n_D / (λ_U·n_U) = kto.weight_ratio."""
  kind = config.trainer
  if kind == "dpo":
    return Objective("dpo", beta=config.dpo.beta, label_smoothing=config.dpo.label_smoothing)
  cfg = config.kto
  desirable, undesirable = cfg.desirable_weight, cfg.undesirable_weight
  if not desirable > 0:
    raise ValueError(f"kto.desirable_weight must be > 0, got {desirable}")
  if not 1.0 <= cfg.weight_ratio <= 4.0 / 3.0:
    log.warning("kto.weight_ratio=%s is outside KTO's recommended [1, 4/3]", cfg.weight_ratio)
  if label_counts is not None:
    liked, disliked = label_counts
    if cfg.auto_undesirable_weight:
      undesirable = pref_inputs.auto_undesirable_weight(desirable, liked, disliked,
                                                        cfg.weight_ratio)
      log.info("kto weights: %d likes, %d dislikes -> desirable %.4g, undesirable %.4g "
               "(λ_D·n_D / λ_U·n_U = %.3f; kto.auto_undesirable_weight)", liked, disliked,
               desirable, undesirable, desirable * liked / (undesirable * disliked))
    else:
      ratio = desirable * liked / (undesirable * disliked) if undesirable > 0 else float("inf")
      level = logging.INFO if 1.0 <= ratio <= 4.0 / 3.0 else logging.WARNING
      log.log(level, "kto weights: %d likes, %d dislikes, desirable %.4g, undesirable %.4g: "
              "λ_D·n_D / λ_U·n_U = %.3f (KTO recommends [1, 4/3])", liked, disliked, desirable,
              undesirable, ratio)
  return Objective("kto", beta=cfg.beta, desirable_weight=desirable,
                   undesirable_weight=undesirable)
