"""Held-out comparison of finished policies: gold score and win rate against SFT, per language.

Every policy answers the same held-out prompts (the validation split of rlhf_prompts, which no
stage trains on) with the same sampling key, so two policies' answers to a prompt differ only
by the policy. The gold scorer (rlhf_jax/data/labelers.py) stands in for people; win rate is
P(policy's answer scores higher than SFT's to the same prompt), a tie counting half, so SFT
against itself is exactly 0.5.

A win rate alone cannot say whether a policy got better or found a trick (a collapsed policy
answering "Haha haha" to everything beats SFT under VADER), so each comparison also carries
the diagnostics of eval/diagnostics.py -- diversity, greedy diversity, script consistency, the
check scorer's win rate, prompt sensitivity -- and a verdict per policy and language.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Mapping, Sequence

import numpy as np

from rlhf_jax.data import labelers
from rlhf_jax.eval import diagnostics as diag
from rlhf_jax.eval.ppo_periodic import win_rate
from rlhf_jax.data import pipeline
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.infer import answers as respond
from rlhf_jax.core import run_folder
from rlhf_jax.text.hf_tokenizer import load_any_tokenizer

BASELINE = "sft"


def held_out_prompts(tokenizer, langs: Sequence[str], n: int, *, data_dir: str | None,
                     max_prompt_len: int, split: str = "validation") -> dict[str, list[str]]:
  """The first n prompts per language of rlhf_prompts[split] whose rendering fits."""
  records = prompts_lib.read_records(pipeline.load_source("rlhf_prompts", split, data_dir))
  out = {lang: prompts_lib.eval_prompts(records, tokenizer, lang, n, max_prompt_len)
         for lang in langs}
  for lang, prompts in out.items():
    if not prompts:
      raise ValueError(f"no {lang} prompt of rlhf_prompts[{split}] fits in {max_prompt_len} "
                       "tokens")
  return out


def sample_policy(policy_dir: str, tokenizer, prompts: Mapping[str, Sequence[str]], *, seed: int,
                  max_new_tokens: int, temperature: float, top_p: float,
                  greedy: bool = False) -> dict[str, list[str]] | tuple[dict, dict]:
  """{lang: answers} of the policy trained in policy_dir; the key depends on the language
  only, never on the policy. With greedy=True, ({lang: sampled answers}, {lang: greedy
  (temperature 0, argmax) answers}) from one load of the checkpoint."""
  import jax

  params, model_config = run_folder.load_policy(policy_dir)
  key = jax.random.key(seed)

  def run(argmax: bool) -> dict[str, list[str]]:
    return {lang: respond.answer(params, model_config, tokenizer, list(ps),
                                 rng=jax.random.fold_in(key, i), max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, greedy=argmax)
            for i, (lang, ps) in enumerate(prompts.items())}

  return (run(False), run(True)) if greedy else run(False)


def compare(answers: Mapping[str, Mapping[str, Sequence[str]]],
            prompts: Mapping[str, Sequence[str]], *, samples_per_lang: int = 4,
            scorer: str = "gold", check_scorer: str = "check",
            greedy: Mapping[str, Mapping[str, Sequence[str]]] | None = None) -> dict:
  """Scores {policy: {lang: answers}} and compares each policy with the baseline (SFT).

  Returns {"policies", "langs", "metrics": {policy: {lang: {gold, gold_std, win_rate,
  answer_length, n}}}, "samples": {lang: [{prompt, answers: {policy: text}, gold: {policy:
  score}}]}, "diagnostics": {policy: {lang: ...}}, "verdicts": {policy: {line, langs: {lang:
  {verdict, reason}}}}, "verdict_thresholds"}: diagnostics and verdicts as in
  eval/diagnostics.py, the second opinion given by `check_scorer`; greedy: {policy: {lang:
  temperature-0 answers}}, or None (then no greedy diversity, and no collapse judged by it).
  """
  if BASELINE not in answers:
    raise ValueError(f"the baseline policy {BASELINE!r} is missing (got {sorted(answers)})")
  langs = list(prompts)
  gold = {name: {lang: labelers.score(list(by_lang[lang]), lang, scorer) for lang in langs}
          for name, by_lang in answers.items()}
  check = {name: {lang: labelers.score(list(by_lang[lang]), lang, check_scorer)
                  for lang in langs} for name, by_lang in answers.items()}
  metrics: dict = {}
  for name in answers:
    metrics[name] = {}
    for lang in langs:
      g, base = gold[name][lang], gold[BASELINE][lang]
      metrics[name][lang] = {
          "gold": float(np.mean(g)), "gold_std": float(np.std(g)),
          "win_rate": win_rate(g, base),
          "answer_length": float(np.mean([len(a) for a in answers[name][lang]])),
          "n": int(len(g))}
  samples = {lang: [{"prompt": prompts[lang][i],
                     "answers": {name: answers[name][lang][i] for name in answers},
                     "gold": {name: float(gold[name][lang][i]) for name in answers}}
                    for i in range(min(samples_per_lang, len(prompts[lang])))]
             for lang in langs}
  diagnostics, verdicts = diag.diagnose(answers, prompts, gold, check, baseline=BASELINE,
                                        greedy=greedy)
  return {"policies": list(answers), "langs": langs, "metrics": metrics, "samples": samples,
          "diagnostics": diagnostics, "verdicts": verdicts,
          "verdict_thresholds": dataclasses.asdict(diag.THRESHOLDS)}


def evaluate_policies(policies: Mapping[str, str], tokenizer, langs: Sequence[str], *,
                      data_dir: str | None, prompts_per_lang: int, max_prompt_len: int,
                      max_new_tokens: int, temperature: float, top_p: float, seed: int,
                      samples_per_lang: int = 4, greedy: bool = True) -> dict:
  """{policy name: run dir} -> `compare`'s results, plus the prompts and settings used.

  tokenizer: a tokenizer, or the path of one (a sentencepiece .model, an HF directory, a .gguf):
  an imported model's own tokenizer is an object, the tiny pipeline's a path.
  greedy: also answer every prompt by greedy (temperature 0) decoding, for the greedy
  diversity diagnostic (one more generation per policy and language).
  """
  from tqdm.auto import tqdm

  given = tokenizer
  if isinstance(tokenizer, str):
    tokenizer = load_any_tokenizer(tokenizer)
  prompts = held_out_prompts(tokenizer, langs, prompts_per_lang, data_dir=data_dir,
                             max_prompt_len=max_prompt_len)
  answers, greedy_answers = {}, {}
  for name in tqdm(list(policies), desc="evaluate", file=sys.stderr):
    out = sample_policy(policies[name], tokenizer, prompts, seed=seed,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        greedy=greedy)
    answers[name], greedy_answers[name] = out if greedy else (out, None)
  results = compare(answers, prompts, samples_per_lang=samples_per_lang,
                    greedy=greedy_answers if greedy else None)
  results["settings"] = {"prompts_per_lang": {lang: len(p) for lang, p in prompts.items()},
                         "split": "validation", "max_new_tokens": max_new_tokens,
                         "temperature": temperature, "top_p": top_p, "seed": seed,
                         "scorer": "gold", "check_scorer": "check", "greedy": greedy,
                         "policies": dict(policies)}
  if not isinstance(given, str):
    results["settings"]["tokenizer"] = repr(tokenizer)
  return results
