"""One PPO iteration as the train loop's step: prompts -> rollout -> experience -> update.

The numerics are rl/ppo.py's pure functions, jitted in rl/trainer.py; this is the host side of
one iteration, read top to bottom:

  1. the prompt batch becomes a global array; the policy samples answers      (rollout, jit)
  2. the four models score the rollout: rewards, KL, values, advantages   (experience, jit)
  3. a NaN/inf reward stops the run before its update (nothing is saved)
  4. epochs x minibatches of clipped PPO updates, PPO-ptx batches alongside (update, jit)
  5. metrics: the update's, per-language scores and KL, and where the time went

Device values reach the host once per iteration, for the metrics and the checks.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import jax
import numpy as np

from rlhf_jax.core import sharding
from rlhf_jax.models import lora
from rlhf_jax.eval.ppo_periodic import to_host
from rlhf_jax.rl import ppo
from rlhf_jax.train.loop import NonFiniteLossError

log = logging.getLogger(__name__)

PTX_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class NonFiniteRewardError(NonFiniteLossError):
  """A reward went NaN/inf. That iteration's update was not applied; nothing was saved."""


@dataclasses.dataclass
class Iteration:
  """step(state, batch) -> (state, metrics) for `train.loop.run_train_loop`.

  batch: {'prompts': a PromptStream batch (tokens, mask, lang), 'ptx': LM batch (optional)}.
  """
  rollout_fn: Callable  # ({'params': policy}, tokens, mask, key) -> Rollout
  experience_fn: Callable  # (params, frozen, rollout, β) -> (Experience, metrics)
  update_fn: Callable  # (state, experience, ptx) -> (state, stats); donates the state
  frozen: ppo.Frozen
  mesh: Any
  rules: Any
  prompt_stream: Any  # for its count of prompts skipped as too long
  last_good: Callable[[], Any]  # the last checkpoint's step (for the NaN message)
  lora: bool = False  # the state's policy holds adapters; its base is frozen.reference
  langs: tuple = ()  # the run's languages, in order: a per-language β [L] follows it

  def __call__(self, state: ppo.PPOState, batch: dict):
    t0 = time.perf_counter()
    prompts = sharding.make_global_batch(
        {"tokens": batch["prompts"]["tokens"], "mask": batch["prompts"]["mask"]},
        self.mesh, self.rules)
    key = jax.random.fold_in(state.key(), 0)
    policy = state.params["policy"]
    if self.lora:
      policy = lora.merge(policy, self.frozen.reference)
    rollout = jax.block_until_ready(self.rollout_fn(
        {"params": policy}, prompts["tokens"], prompts["mask"], key))
    t1 = time.perf_counter()
    lang, coefs = None, {}
    if state.kl_coef.ndim:  # one β per language: each row's language index [B]
      lang = row_lang_index(batch["prompts"]["lang"], self.langs)
      coefs = {f"objective/{name}/kl_coef": float(c)
               for name, c in zip(self.langs, jax.device_get(state.kl_coef))}
    experience, exp_metrics = self.experience_fn(state.params, self.frozen, rollout,
                                                 state.kl_coef, lang)
    exp_metrics = jax.device_get(exp_metrics)
    scores, seq_kl = to_host(experience.scores), to_host(experience.kl)  # [B], [B]
    t2 = time.perf_counter()
    if not bool(exp_metrics.pop("finite")):
      good = self.last_good()
      raise NonFiniteRewardError(
          f"a reward is NaN/inf at iteration {int(state.step) + 1}: stopped before its update. "
          f"The last good checkpoint ({'iteration ' + str(good) if good is not None else 'none'})"
          " is kept.")
    ptx = None
    if "ptx" in batch:
      ptx = sharding.make_global_batch({k: batch["ptx"][k] for k in PTX_KEYS}, self.mesh,
                                       self.rules)
    state, stats = self.update_fn(state, self.frozen, experience, ptx)
    stats = jax.device_get(stats)
    t3 = time.perf_counter()
    metrics = {k: float(v) for k, v in exp_metrics.items()}
    metrics.update(summarize_update(stats))
    if metrics["ppo/skipped_updates"]:
      log.warning("iteration %d: %d minibatch updates had a non-finite loss, gradient or params "
                  "and were skipped", int(state.step), int(metrics["ppo/skipped_updates"]))
    metrics.update(per_language(batch["prompts"]["lang"], scores, seq_kl))
    metrics.update(coefs)
    metrics.update({
        "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
        "time/iteration": t3 - t0, "train/episodes_per_s": len(scores) / max(t3 - t0, 1e-9),
        "train/tokens": metrics.pop("rollout/tokens"),
        "rollout/skipped_prompts": float(self.prompt_stream.skipped), "train/finite": True})
    return state, metrics


def global_row_langs(local_langs) -> np.ndarray:
  """[B] the language of each global row. Every process's rows are laid out alike, so the
  global rows' languages repeat the local ones (and every process builds the same array)."""
  return np.tile(np.asarray(local_langs), jax.process_count())


def row_lang_index(local_langs, langs: tuple) -> np.ndarray:
  """[B] int32: each global row's index in langs."""
  row_langs = global_row_langs(local_langs)
  unknown = sorted(set(row_langs) - set(langs))
  if unknown:
    raise ValueError(f"prompts in {unknown}, not one of the run's languages {list(langs)}")
  return np.asarray([langs.index(lang) for lang in row_langs], np.int32)


def per_language(local_langs, scores: np.ndarray, seq_kl: np.ndarray) -> dict:
  """objective/<lang>/{scores,kl} when a batch mixes languages."""
  if len(set(local_langs)) < 2:
    return {}
  row_langs = global_row_langs(local_langs)
  out = {}
  for lang in sorted(set(local_langs)):
    out[f"objective/{lang}/scores"] = float(np.mean(scores[row_langs == lang]))
    out[f"objective/{lang}/kl"] = float(np.mean(seq_kl[row_langs == lang]))
  return out


def summarize(host: dict, steps: int, seconds: float):
  """The loop's summarize: PPO's metrics as they are, and the progress bar's postfix."""
  return host, {"score": f"{host['objective/scores']:.3f}", "kl": f"{host['objective/kl']:.2f}",
                "ep_s": f"{host['train/episodes_per_s']:.1f}"}


def summarize_update(stats: dict) -> dict:
  """Per-iteration means of the update's [epochs, minibatches] stats (host side, numpy)."""
  out = {k: float(np.mean(v)) for k, v in stats.items() if k != "finite"}
  out["ppo/skipped_updates"] = float(np.size(stats["finite"]) - np.sum(stats["finite"]))
  return out
