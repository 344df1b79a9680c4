r"""Comparison data for the reward model: K answers per prompt, graded by simulated annotators.

The recipe's labelling step, simulated: the SFT policy answers each training prompt K times,
a gold scorer (rlhf_jax/data/labelers.py) scores the answers, and annotators whose noise is
calibrated so two of them agree as often as people do (72.6%) grade each answer good, average
or poor (rlhf_jax/data/annotators.py). The records go to `rlhf_comparisons/<config>`, which the
reward config reads (`data=rlhf_comparisons/<config>`).

  python -m rlhf_jax.recipe.comparisons --sft=W/sft --config=round0 --data_dir=W/tfds \
      --prompts_per_lang=1000 --k=4

Prompts come from rlhf_prompts; since splits are a hash of the prompt, a training prompt's
comparisons land in the training split here too. Answers of one prompt that are empty or
duplicates are dropped (a comparison between two copies is noise), and a prompt left with fewer
than two answers is dropped; all of it is counted in the info JSON printed at the end, with the
annotators' temperature per language and their agreement with the gold ordering.

`planted_records` makes a comparisons set with a planted rule (labelers' "planted" scorer:
positive minus negative words), for tests: an RM that learns it shows up as held-out accuracy
well above chance.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Mapping, Sequence

import numpy as np

from rlhf_jax.core.langs import LANGS
from rlhf_jax.core import run_folder
from rlhf_jax.data import annotators, labelers
from rlhf_jax.infer import answers as respond
from rlhf_jax.data.rm_batches import read_records
from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
from rlhf_jax.data import builders

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# A planted rule, for tests: answers of random words scored by labelers' "planted" scorer.


def _planted_answer(lang: str, rng: np.random.Generator, min_words: int, max_words: int) -> str:
  words = labelers.PLANTED_WORDS[lang]
  n = int(rng.integers(min_words, max_words + 1))
  n_sentiment = int(rng.integers(0, min(n, 4) + 1))
  chosen = list(rng.choice(words["neutral"], size=n - n_sentiment))
  chosen += list(rng.choice(words["pos"] + words["neg"], size=n_sentiment))
  rng.shuffle(chosen)
  return (" " if lang == "en" else "").join(chosen)


def planted_answers(n_prompts: int, k: int, *, seed: int = 0, langs=LANGS, min_words: int = 3,
                    max_words: int = 8) -> tuple[list[str], list[list[str]], list[str]]:
  """(prompts, K distinct answers each, langs): random word strings in each language."""
  rng = np.random.default_rng(seed)
  prompts, answers, out_langs = [], [], []
  for n in range(n_prompts):
    lang = langs[n % len(langs)]
    prompts.append(f"Tell me about thing number {n}." if lang == "en" else f"说说第{n}号东西。")
    seen: list[str] = []
    while len(seen) < k:
      a = _planted_answer(lang, rng, min_words, max_words)
      if a not in seen:
        seen.append(a)
    answers.append(seen)
    out_langs.append(lang)
  return prompts, answers, out_langs


def planted_records(n_prompts: int, k: int = 4, *, seed: int = 0, langs=LANGS,
                    label: str = "grades", tau: float | None = None,
                    target_agreement: float = annotators.HUMAN_AGREEMENT):
  """(records, info) of a planted comparisons set, graded like the real one."""
  prompts, answers, out_langs = planted_answers(n_prompts, k, seed=seed, langs=langs)
  return build_records(prompts, answers, out_langs, scorer="planted", seed=seed, label=label,
                       tau=tau, target_agreement=target_agreement, source="planted")


# ---------------------------------------------------------------------------------------------
# Grading.


def _clean(answers: Sequence[str], counts: dict) -> list[str]:
  """Answers with empty ones and repeats removed, first occurrence kept."""
  out: list[str] = []
  for a in answers:
    if not a.strip():
      counts["empty_answers"] += 1
    elif a in out:
      counts["duplicate_answers"] += 1
    else:
      out.append(a)
  return out


def _calibrate(scores_by_prompt: list[np.ndarray], target: float, lang: str) -> tuple[float, str]:
  """tau for one language on the in-prompt pairs of its answers.

  When too many pairs have tied gold scores for the target to be reachable (annotators agree
  on a tie only half the time; a weak policy's answers are often all neutral), tau is fitted
  on the untied pairs instead, so the pairs that carry a preference are as noisy as people's;
  said loudly, and recorded in the info.
  """
  pairs = [np.stack([s[i], s[j]]) for s in scores_by_prompt
           for i in range(len(s)) for j in range(i + 1, len(s))]
  if not pairs:
    return 0.0, "no pairs"
  pairs = np.stack(pairs)
  try:
    return annotators.calibrate_temperature(pairs, target), "calibrated"
  except ValueError as e:
    untied = pairs[pairs[:, 0] != pairs[:, 1]]
    log.warning("%s: %s -- calibrating on the %d untied pairs instead", lang, e, len(untied))
    if len(untied) == 0:
      return 0.0, "all pairs tied: noiseless"
    return (annotators.calibrate_temperature(untied, target),
            f"calibrated on untied pairs ({len(untied)} of {len(pairs)})")


def label_answers(panel, s: np.ndarray, label: str, **record):
  """(record with the panel's grades or ranking of answers with gold scores s [K], pairs where
  the label agrees with gold, pairs gold orders)."""
  ranking = panel.rank(s[None])[0]
  k = len(s)
  if label == "grades":
    record["grades"] = [int(g) for g in annotators.grades_from_rankings(ranking[None])[0]]
    prefer = np.asarray(record["grades"])[:, None] < np.asarray(record["grades"])[None, :]
  else:
    record["ranking"] = [int(r) for r in ranking]
    position = np.empty(k, int)
    position[ranking] = np.arange(k)
    prefer = position[:, None] < position[None, :]
  gold_prefer = s[:, None] > s[None, :]
  return (record, int((prefer & gold_prefer).sum()),
          int((prefer & (gold_prefer | gold_prefer.T)).sum()))


def build_records(prompts: Sequence, answers: Sequence[Sequence[str]], langs: Sequence[str], *,
                  scorer: str = "gold", seed: int = 0, label: str = "grades",
                  tau: float | None = None, n_annotators: int = 1,
                  target_agreement: float = annotators.HUMAN_AGREEMENT, source: str = ""):
  """Gold-scores, grades (or ranks) each prompt's answers; returns (records, info).

  tau None calibrates it per language on these answers' scores to `target_agreement`.
  """
  if label not in ("grades", "ranking"):
    raise ValueError(f"label must be 'grades' or 'ranking', got {label!r}")
  score = labelers.get_scorer(scorer)
  info: dict = {"scorer": scorer, "label": label, "target_agreement": target_agreement,
                "langs": {}}
  records = []
  for li, lang in enumerate(LANGS):
    idx = [i for i, l in enumerate(langs) if l == lang]
    if not idx:
      continue
    counts = {"prompts_in": len(idx), "empty_answers": 0, "duplicate_answers": 0,
              "dropped_prompts": 0}
    kept = []
    for i in idx:
      clean = _clean(answers[i], counts)
      if len(clean) < 2:
        counts["dropped_prompts"] += 1
      else:
        kept.append((i, clean))
    flat = [a for _, clean in kept for a in clean]
    flat_scores = score(flat, lang) if flat else np.zeros(0)
    per_prompt, offset = [], 0
    for _, clean in kept:
      per_prompt.append(np.asarray(flat_scores[offset:offset + len(clean)], np.float64))
      offset += len(clean)
    if tau is None:
      lang_tau, how = _calibrate(per_prompt, target_agreement, lang)
    else:
      lang_tau, how = float(tau), "given"
    panel = annotators.AnnotatorPanel(lang_tau, n_annotators, seed=seed + 1000 * li)
    agree = n_gold_pairs = 0
    for (i, clean), s in zip(kept, per_prompt):
      record, agreeing, gold_pairs = label_answers(
          panel, s, label, id=f"{source or 'cmp'}-{lang}-{i}", prompt=prompts[i],
          responses=clean, lang=lang, source=source)
      agree, n_gold_pairs = agree + agreeing, n_gold_pairs + gold_pairs
      records.append(record)
    all_scores = np.concatenate(per_prompt) if per_prompt else np.zeros(0)
    info["langs"][lang] = {
        **counts, "comparisons": len(kept), "tau": lang_tau, "tau_status": how,
        "mean_k": float(np.mean([len(c) for _, c in kept])) if kept else 0.0,
        "expected_agreement": (float(np.mean([annotators.expected_agreement(p[None], lang_tau)
                                              for p in per_prompt if len(p) > 1]))
                               if per_prompt else float("nan")),
        "label_gold_agreement": agree / n_gold_pairs if n_gold_pairs else float("nan"),
        "gold_mean": float(all_scores.mean()) if all_scores.size else float("nan"),
        "gold_std": float(all_scores.std()) if all_scores.size else float("nan"),
        "tied_pair_fraction": float(np.mean([
            (p[:, None] == p[None, :])[np.triu_indices(len(p), 1)].mean() for p in per_prompt]))
                              if per_prompt else float("nan"),
    }
  return records, info


# ---------------------------------------------------------------------------------------------
# Sampling from the SFT policy.


def sample_answers(params, model_config, tokenizer, prompts: Sequence[str], k: int, *,
                   seed: int = 0, max_new_tokens: int = 48, temperature: float = 1.0,
                   top_p: float = 1.0, batch_size: int = 64) -> list[list[str]]:
  """K sampled answers per prompt (each prompt repeated K times in the batch)."""
  import jax
  from tqdm.auto import tqdm

  rows = [p for p in prompts for _ in range(k)]
  key = jax.random.key(seed)
  flat: list[str] = []
  for start in tqdm(range(0, len(rows), batch_size), desc="sampling", file=sys.stderr,
                    mininterval=2.0):
    chunk = rows[start:start + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled batch shape
    out = respond.answer(params, model_config, tokenizer, padded,
                         rng=jax.random.fold_in(key, start), max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p)
    flat.extend(out[:len(chunk)])
  return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]


def choose_prompts(tokenizer, per_lang: int | Mapping[str, int], *, data_dir: str | None,
                   seed: int,
                   max_prompt_tokens: int, splits=("train", "validation", "test"),
                   sources: Sequence[str] = (), langs: Sequence[str] = LANGS
                   ) -> tuple[list[str], list[str]]:
  """Up to per_lang prompts per language ({lang: n} for one number each) from rlhf_prompts
  (all splits: each keeps its split through the prompt hash), short enough to leave the answer
  room. One seed draws one order: a language's first n prompts are the same for any n."""
  if not isinstance(per_lang, Mapping):
    per_lang = {lang: per_lang for lang in langs}
  records = []
  for split in splits:
    records.extend(read_records("rlhf_prompts", split, data_dir))
  order = np.random.default_rng(seed).permutation(len(records))
  counts = {lang: 0 for lang in langs}
  prompts, out_langs = [], []
  for i in order:
    r = records[i]
    if r["lang"] not in counts or counts[r["lang"]] >= per_lang.get(r["lang"], 0):
      continue
    if sources and r["source"] not in sources:
      continue
    if len(tokenizer.encode(r["prompt"])) > max_prompt_tokens:
      continue
    prompts.append(r["prompt"])
    out_langs.append(r["lang"])
    counts[r["lang"]] += 1
  return prompts, out_langs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sft", required=True, help="an SFT run's workdir (or its checkpoints/)")
  p.add_argument("--tokenizer", default="", help="default: the SFT run's own tokenizer")
  p.add_argument("--config", default="round0", help="writes rlhf_comparisons/<config>")
  p.add_argument("--data_dir", default="", help="TFDS data_dir (default ~/.cache/rlhf_jax/tfds)")
  p.add_argument("--prompts_data_dir", default="", help="where rlhf_prompts is (default: data_dir)")
  p.add_argument("--prompts_per_lang", type=int, default=1000)
  p.add_argument("--langs", default=",".join(LANGS), help="comma-separated: en, zh or both")
  p.add_argument("--k", type=int, default=4, help="answers sampled per prompt")
  p.add_argument("--max_new_tokens", type=int, default=48)
  p.add_argument("--max_prompt_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--label", default="grades", choices=("grades", "ranking"))
  p.add_argument("--scorer", default="gold")
  p.add_argument("--agreement", type=float, default=annotators.HUMAN_AGREEMENT)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)

  params, model_config = run_folder.load_policy(args.sft)
  tok_path = args.tokenizer or run_folder.tokenizer_source(args.sft)
  tokenizer = load_any_tokenizer(tok_path)
  data_dir = args.data_dir or None
  prompts, langs = choose_prompts(tokenizer, args.prompts_per_lang,
                                  data_dir=args.prompts_data_dir or data_dir,
                                  seed=args.seed, max_prompt_tokens=args.max_prompt_tokens,
                                  langs=tuple(args.langs.split(",")))
  answers = sample_answers(params, model_config, tokenizer, prompts, args.k, seed=args.seed,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, batch_size=args.batch_size)
  records, info = build_records(prompts, answers, langs, scorer=args.scorer, seed=args.seed,
                                label=args.label, target_agreement=args.agreement,
                                source=f"sft:{os.path.abspath(args.sft)}")
  path = builders.write_comparisons(records, config=args.config, data_dir=data_dir,
                                    overwrite=args.overwrite,
                                    description=f"K={args.k} answers from {args.sft}")
  info.update({"path": path, "records": len(records), "sft": os.path.abspath(args.sft),
               "k": args.k, "tokenizer": tok_path})
  with open(os.path.join(path, "comparisons_info.json"), "w") as f:
    json.dump(info, f, indent=1, ensure_ascii=False)
  print(json.dumps(info, indent=1, ensure_ascii=False))
  return info


if __name__ == "__main__":
  main()
