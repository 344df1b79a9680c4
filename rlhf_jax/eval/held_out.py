"""Held-out evaluators: one interface, `evaluator(step, params) -> metrics`, one batched apply.

Every evaluator a trainer runs periodically (train/loop.py's `Evaluation`) is an instance of
this interface:

  RewardModelHeldOut   held-out comparisons: accuracy against the labels and the gold ordering,
                       margin, calibration (eval/rm/*)
  PreferenceHeldOut    held-out likes/dislikes (KTO) or pairs (DPO): the implied reward's
                       ranking of them against the frozen reference (eval/kto/*, eval/dpo/*)
  PolicySamples        PPO's: answers sampled to held-out prompts, gold score and win rate
                       against the SFT policy (eval/ppo_periodic.py)

A held-out set is encoded once into host arrays padded to a whole number of batches;
`BatchedApply` runs one jitted, sharded function over it (each process feeds its own rows of
every batch) and gathers the results on the host.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.core import sharding
from rlhf_jax.core.langs import LANGS
from rlhf_jax.data import preference_batches as pref_inputs
from rlhf_jax.data import rm_batches
from rlhf_jax.eval import reward_model as evaluate_rm
from rlhf_jax.infer import logprobs as logprobs_lib
from rlhf_jax.infer.rm_scores import comparison_scores

log = logging.getLogger(__name__)


def to_host(x) -> np.ndarray:
  """A global array as numpy on every process (gathered when it spans several)."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def padded_size(n: int, batch_size: int) -> int:
  return -(-n // batch_size) * batch_size


class BatchedApply:
  """fn(params, batch) over host arrays [N_padded, ...] in batches of `batch_size`, jitted with
  the params' shardings and batch-split inputs; returns the first `n` rows, on the host."""

  def __init__(self, fn: Callable, arrays: dict, keys: Sequence[str], *, n: int, batch_size: int,
               mesh, rules, param_shardings):
    self.arrays, self.keys, self.n, self.batch_size = arrays, tuple(keys), n, batch_size
    self.mesh, self.rules = mesh, rules
    shardings = {k: sharding.batch_sharding(mesh, rules, arrays[k].ndim) for k in self.keys}
    self._fn = jax.jit(fn, in_shardings=(param_shardings, shardings))

  def __call__(self, params) -> np.ndarray:
    p, count = jax.process_index(), jax.process_count()
    local = self.batch_size // count
    outs = []
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      for start in range(0, len(self.arrays[self.keys[0]]), self.batch_size):
        rows = slice(start + p * local, start + (p + 1) * local)
        batch = sharding.make_global_batch({k: self.arrays[k][rows] for k in self.keys},
                                           self.mesh, self.rules)
        outs.append(to_host(self._fn(params, batch)))
    return np.concatenate(outs)[:self.n]


# ---------------------------------------------------------------------------------------------
# The reward model.


class RewardModelHeldOut:
  """The held-out comparisons, encoded once, with their gold scores: eval/rm/* of the params."""

  def __init__(self, config, tokenizer, model, mesh, rules, param_shardings):
    self.config = config
    data = config.data
    self.records = rm_batches.read_records(data.name, config.eval.split, data.data_dir or None,
                                           config.eval.max_comparisons)
    batch_size = config.eval.batch_size or data.batch_size
    encoder = rm_batches.encoder_for(data, tokenizer)
    n = len(self.records)
    self.arrays = encoder.encode_batch(self.records, [None] * n, padded_size(n, batch_size))
    self.stats = self.arrays.pop("stats")
    self.n = n
    self.gold = (evaluate_rm.gold_scores(self.records, data.max_answers, config.eval.scorer)
                 if config.eval.scorer else None)
    self.scores = BatchedApply(lambda params, batch: comparison_scores(params, batch, model),
                               self.arrays, rm_batches.MODEL_KEYS[encoder.layout], n=n,
                               batch_size=batch_size, mesh=mesh, rules=rules,
                               param_shardings=param_shardings)
    log.info("held-out: %d comparisons of %s[%s]", n, data.name, config.eval.split)

  def __call__(self, step: int, params) -> dict[str, float]:
    scores = self.scores(params)  # [N, K]
    a = {k: v[:self.n] for k, v in self.arrays.items()}
    metrics, _ = evaluate_rm.comparison_metrics(
        scores, a["valid"], a["prefer"], a["lang"], self.gold, a["label"], a["labeled"],
        self.config.eval.bins)
    return {f"eval/rm/{k}": v for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# KTO and DPO.


def preferred_rate(winners, losers) -> float:
  """P(w > l) + ½·P(w == l) over every (winner, loser) pair of two score lists: a rank
  statistic (the Mann-Whitney U over n_w·n_l), computed by sorting rather than pair by pair."""
  w = np.sort(np.asarray(winners, np.float64))
  l = np.asarray(losers, np.float64)
  if not len(w) or not len(l):
    return float("nan")
  above = len(w) - np.searchsorted(w, l, side="right")  # winners strictly above each loser
  ties = np.searchsorted(w, l, side="right") - np.searchsorted(w, l, side="left")
  return float((above.sum() + 0.5 * ties.sum()) / (len(w) * len(l)))


def mean_or_nan(x) -> float:
  return float(np.mean(x)) if len(x) else float("nan")


def kto_eval_metrics(policy, reference, tokens, label, lang, beta: float) -> dict[str, float]:
  """eval/kto/* from per-answer log-probs [M] (policy, reference), answer lengths, labels."""
  reward = beta * (policy - reference)
  per_token = policy / np.maximum(tokens, 1.0)
  out = {}
  groups = [("", np.ones_like(label, bool))]
  langs = sorted(set(lang.tolist()))
  if len(langs) > 1:
    groups += [(f"/{LANGS[i]}", lang == i) for i in langs if i >= 0]
  for suffix, rows in groups:
    liked, disliked = rows & (label == 1), rows & (label == 0)
    out[f"eval/kto/liked_over_disliked{suffix}"] = preferred_rate(reward[liked],
                                                                  reward[disliked])
    out[f"eval/kto/logp_liked_over_disliked{suffix}"] = preferred_rate(per_token[liked],
                                                                       per_token[disliked])
    out[f"eval/kto/reward_liked{suffix}"] = mean_or_nan(reward[liked])
    out[f"eval/kto/reward_disliked{suffix}"] = mean_or_nan(reward[disliked])
    out[f"eval/kto/logp_per_token_liked{suffix}"] = mean_or_nan(per_token[liked])
    out[f"eval/kto/logp_per_token_disliked{suffix}"] = mean_or_nan(per_token[disliked])
    out[f"eval/kto/liked{suffix}"] = float(liked.sum())
    out[f"eval/kto/disliked{suffix}"] = float(disliked.sum())
  return out


def dpo_eval_metrics(policy, reference, tokens, beta: float,
                     label_smoothing: float) -> dict[str, float]:
  """eval/dpo/* from [M, 2] (chosen, rejected) log-probs and answer lengths."""
  reward = beta * (policy - reference)
  margin = reward[:, 0] - reward[:, 1]
  per_token = policy / np.maximum(tokens, 1.0)
  token_margin = per_token[:, 0] - per_token[:, 1]
  softplus = lambda x: np.logaddexp(0.0, x)  # noqa: E731
  loss = (1 - label_smoothing) * softplus(-margin) + label_smoothing * softplus(margin)
  return {"eval/dpo/accuracy": float(np.mean((margin > 0) + 0.5 * (margin == 0))),
          "eval/dpo/logp_accuracy": float(np.mean((token_margin > 0) + 0.5 * (token_margin == 0))),
          "eval/dpo/margin": float(np.mean(margin)),
          "eval/dpo/loss": float(np.mean(loss)),
          "eval/dpo/pairs": float(len(margin))}


def preference_held_out_data(config, kind: str):
  """The held-out split of every data set named in config.data.names that has one."""
  data_cfg, eval_cfg = config.data, config.eval
  names = []
  for name in pref_inputs.parse_names(data_cfg.names):
    try:
      pref_inputs.PreferenceData(kind, name, eval_cfg.split, data_cfg.data_dir or None)
      names.append(name)
    except ValueError as e:  # a small data set whose hashed split came out empty
      log.warning("no held-out %s from %s: %s", eval_cfg.split, name, str(e)[:300])
  if not names:
    raise ValueError(f"no held-out {eval_cfg.split!r} split in {data_cfg.names}")
  return names, pref_inputs.PreferenceData(kind, names, eval_cfg.split, data_cfg.data_dir or None,
                                           limit=eval_cfg.max_examples)


class PreferenceHeldOut:
  """The held-out split, encoded once. `evaluator(step, policy)` (bound to the frozen
  reference with `bind`) or `evaluate(policy, reference)` returns eval/<kind>/* metrics; the
  reference's log-probs are computed once."""

  def __init__(self, config, tokenizer, objective, model_config, mesh, rules, param_shardings):
    data_cfg = config.data
    kind = objective.kind
    names, data = preference_held_out_data(config, kind)
    self.objective = objective
    batch_size = config.eval.batch_size or data_cfg.batch_size
    encoder = pref_inputs.PreferenceEncoder(tokenizer, kind=kind,
                                            max_prompt_len=data_cfg.max_prompt_len,
                                            max_answer_len=data_cfg.max_answer_len)
    elements = data.records()
    self.n = len(elements)
    self.arrays = encoder.encode_batch([r for r, _ in elements], [p for _, p in elements],
                                       padded_size(self.n, batch_size))
    self.arrays.pop("stats")

    def logps(params, batch):
      rows = pref_inputs.flat_rows(batch)
      return logprobs_lib.sequence_logprobs(params, *logprobs_lib.row_args(rows),
                                            model_config=model_config
                                            ).reshape(batch["valid"].shape + (-1,))  # [B, K]

    self.logprobs = BatchedApply(logps, self.arrays, pref_inputs.ROW_KEYS + ("valid",),
                                 n=self.n, batch_size=batch_size, mesh=mesh, rules=rules,
                                 param_shardings=param_shardings)
    self._reference = None  # (the frozen params, their log-probs): computed once
    log.info("held-out: %d %s elements of %s[%s]", self.n, kind, "+".join(names),
             config.eval.split)

  def evaluate(self, policy, reference) -> dict[str, float]:
    if self._reference is None or self._reference[0] is not reference:
      self._reference = (reference, self.logprobs(reference).astype(np.float64))
    ref = self._reference[1]
    pol = ref if policy is reference else self.logprobs(policy).astype(np.float64)
    tokens = self.arrays["answer_mask"].sum(-1)[:self.n]  # [M, K]
    if self.objective.kind == "kto":
      return kto_eval_metrics(pol[:, 0], ref[:, 0], tokens[:, 0],
                              self.arrays["label"][:self.n], self.arrays["lang"][:self.n],
                              self.objective.beta)
    return dpo_eval_metrics(pol, ref, tokens, self.objective.beta,
                            self.objective.label_smoothing)

  def bind(self, reference) -> Callable[[int, object], dict]:
    """The evaluator interface, (step, params) -> metrics, against a frozen reference."""
    return lambda step, params: self.evaluate(params, reference)
