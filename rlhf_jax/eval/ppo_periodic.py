"""Held-out evaluation of a PPO run: gold score and win rate against the SFT policy, per language.

The gold scorer (rlhf_jax/data/labelers.py) stands in for people: the proxy reward model was
trained from its (noisy) rankings, the policy was optimised against the proxy, and here both
are read side by side with the KL to the SFT policy, the picture of reward over-optimisation
(Gao et al., 2023): proxy keeps rising with KL while gold eventually turns down.

The SFT answers are sampled once per run with a fixed key (the reference never changes), the
policy's with the same key at every evaluation, so consecutive evaluations differ only by the
policy. Win rate counts a tie as half a win.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import jax
import numpy as np

from rlhf_jax.data import labelers
from rlhf_jax.eval.held_out import to_host  # noqa: F401 (used here and re-exported)
from rlhf_jax.data import prompts as prompts_lib


def win_rate(scores: np.ndarray, baseline: np.ndarray) -> float:
  """P(score > baseline) + ½ P(score == baseline), pairing answers to the same prompt."""
  scores, baseline = np.asarray(scores), np.asarray(baseline)
  return float(np.mean(scores > baseline) + 0.5 * np.mean(scores == baseline))


def decode_answers(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
  """Answer texts, without the stop token."""
  stop = set(tokenizer.stop_ids())
  return [tokenizer.decode([int(t) for t, m in zip(row, row_mask) if m and int(t) not in stop])
          for row, row_mask in zip(tokens, mask)]


class Evaluator:
  """Samples the policy and the SFT reference on fixed prompts and compares them.

  rollout_fn(params, tokens, mask, rng) -> Rollout (the evaluation sampling settings);
  proxy_fn(frozen, rollout) -> [B] RM scores; ref_logprobs_fn(reference, rollout) -> [B, N];
  place(numpy array) -> device array (the trainer lays prompts out as it does its batches, so
  evaluation can reuse the training sampler's compilation).
  """

  def __init__(self, tokenizer, prompts: dict[str, Sequence[str]], *, max_prompt_len: int,
               rollout_fn: Callable, proxy_fn: Callable, ref_logprobs_fn: Callable,
               samples_dir: str, seed: int, scorer="gold", place: Callable = lambda x: x):
    self.tokenizer = tokenizer
    self.prompts = {lang: list(p) for lang, p in prompts.items() if p}
    self.inputs = {}
    for lang, ps in self.prompts.items():
      tokens, mask = prompts_lib.pad_left([prompts_lib.render(tokenizer, p) for p in ps],
                                          max_prompt_len, tokenizer.pad_id)
      self.inputs[lang] = (place(tokens), place(mask))
    self.rollout_fn, self.proxy_fn, self.ref_logprobs_fn = rollout_fn, proxy_fn, ref_logprobs_fn
    self.samples_dir = samples_dir
    self.key = jax.random.key(seed)
    self.scorer = scorer
    self._sft: dict[str, dict] = {}

  def _answers(self, params, frozen, lang: str) -> dict:
    tokens, mask = self.inputs[lang]
    key = jax.random.fold_in(self.key, prompts_lib.LANG_CHOICES["both"].index(lang))
    rollout = self.rollout_fn({"params": params}, tokens, mask, key)
    proxy = self.proxy_fn(frozen, rollout)
    ref = self.ref_logprobs_fn(frozen.reference, rollout)
    host = jax.tree.map(to_host, {
        "tokens": rollout.answer_tokens, "mask": rollout.answer_mask,
        "logprobs": rollout.logprobs, "ref": ref, "proxy": proxy, "ended": rollout.ended})
    texts = decode_answers(self.tokenizer, host["tokens"], host["mask"])
    return {"texts": texts, "gold": labelers.score(texts, lang, self.scorer),
            "proxy": np.asarray(host["proxy"], np.float32),
            "kl": np.sum((host["logprobs"] - host["ref"]) * host["mask"], axis=-1),
            "length": host["mask"].sum(-1), "ended": host["ended"]}

  def __call__(self, step: int, policy_params, frozen, sft_params=None) -> dict[str, float]:
    """sft_params: the SFT policy for the policy's model (default frozen.reference; with
    LoRA the policy with zero adapters), answered with once and kept."""
    metrics: dict[str, float] = {}
    samples = []
    for lang in self.prompts:
      if lang not in self._sft:
        sft = frozen.reference if sft_params is None else sft_params
        self._sft[lang] = self._answers(sft, frozen, lang)
      sft, new = self._sft[lang], self._answers(policy_params, frozen, lang)
      prefix = f"eval/{lang}/"
      metrics.update({
          prefix + "gold": float(np.mean(new["gold"])),
          prefix + "gold_sft": float(np.mean(sft["gold"])),
          prefix + "win_rate": win_rate(new["gold"], sft["gold"]),
          prefix + "proxy": float(np.mean(new["proxy"])),
          prefix + "proxy_sft": float(np.mean(sft["proxy"])),
          prefix + "kl": float(np.mean(new["kl"])),
          prefix + "answer_length": float(np.mean(new["length"])),
          prefix + "eos_rate": float(np.mean(new["ended"])),
      })
      for i, prompt in enumerate(self.prompts[lang]):
        samples.append({"lang": lang, "prompt": prompt, "answer": new["texts"][i],
                        "gold": float(new["gold"][i]), "proxy": float(new["proxy"][i]),
                        "answer_sft": sft["texts"][i], "gold_sft": float(sft["gold"][i]),
                        "proxy_sft": float(sft["proxy"][i])})
    if jax.process_index() == 0:
      os.makedirs(self.samples_dir, exist_ok=True)
      path = os.path.join(self.samples_dir, f"iteration_{step:06d}.jsonl")
      with open(path, "w") as f:
        for row in samples:
          f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return metrics
