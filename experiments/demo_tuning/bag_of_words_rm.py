r"""A bag-of-pieces reward model on a pipeline run's comparisons: what a purely lexical learner
reaches on the same rankings, as a yardstick for the transformer RM.

The model: score(answer) = w . counts(answer's tokenizer pieces), trained with the same
Bradley-Terry loss over every pair the ranking implies (plus L2), by full-batch gradient
descent in numpy; evaluated like the RM, as accuracy against the gold scorer's ordering on the
held-out comparisons (gold ties and missing answers give no pair), per language.

  python experiments/demo_tuning/bag_of_words_rm.py --workdir=<a pipeline workdir> \
      [--l2=1e-3,1e-2,3e-2] [--steps=400]

Run from the directory the pipeline ran in (the workdir's saved paths are relative to it).
Prints one JSON object, then a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from rlhf_jax.data.builders import comparison_pairs  # noqa: E402
from rlhf_jax.eval.reward_model import comparison_metrics, gold_scores  # noqa: E402
from rlhf_jax.text.tokenizer import Tokenizer  # noqa: E402
from rlhf_jax.data.rm_batches import read_records  # noqa: E402

K = 4


def piece_counts(records, tokenizer, vocab: int) -> np.ndarray:
  """[N, K, V] piece counts of each record's answers (zeros where a record has fewer)."""
  x = np.zeros((len(records), K, vocab), np.float32)
  for n, record in enumerate(records):
    for k, text in enumerate(record["responses"][:K]):
      np.add.at(x[n, k], tokenizer.encode(text), 1.0)
  return x


def fit(x: np.ndarray, records, l2: float, steps: int, lr: float = 2.0) -> np.ndarray:
  """w [V] minimising mean -log sigmoid(w.(x_better - x_worse)) + l2/2 |w|^2."""
  rows = [(n, better, worse) for n, record in enumerate(records)
          for better, worse in comparison_pairs(record)]
  n, b, w_ = (np.array(c) for c in zip(*rows))
  diff = x[n, b] - x[n, w_]  # [P, V]
  w = np.zeros(x.shape[-1], np.float32)
  for _ in range(steps):
    p = 1.0 / (1.0 + np.exp(-(diff @ w)))
    w -= lr * (-(diff.T @ (1.0 - p)) / len(diff) + l2 * w)
  return w


def gold_accuracy(scores: np.ndarray, gold: np.ndarray) -> tuple[float, int]:
  """(accuracy, untied pairs) of scores [N, K] against gold [N, K] (NaN: no answer), counted
  as the RM's evaluation counts them (`evaluate_rm.comparison_metrics`: a score tie is half)."""
  n, k = scores.shape
  metrics, _ = comparison_metrics(np.nan_to_num(scores), np.isfinite(gold), np.zeros((n, k, k)),
                                  np.zeros(n, int), gold=gold)
  return metrics["gold_accuracy"], int(metrics["gold_pairs"])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--name", default="round0", help="comparisons config (rlhf_comparisons/<name>)")
  p.add_argument("--l2", default="1e-3,1e-2,3e-2")
  p.add_argument("--steps", type=int, default=400)
  args = p.parse_args(argv)

  tokenizer = Tokenizer.load(os.path.join(args.workdir, "tokenizer", "tokenizer.model"))
  data_dir = os.path.join(args.workdir, "comparisons", "tfds")
  splits = {s: read_records(f"rlhf_comparisons/{args.name}", s, data_dir, 0)
            for s in ("train", "validation")}
  results = []
  for lang in ("en", "zh"):
    train = [r for r in splits["train"] if r["lang"] == lang]
    held = [r for r in splits["validation"] if r["lang"] == lang]
    x_train = piece_counts(train, tokenizer, tokenizer.vocab_size)
    x_held = piece_counts(held, tokenizer, tokenizer.vocab_size)
    gold = gold_scores(held, K)
    for l2 in (float(v) for v in args.l2.split(",")):
      w = fit(x_train, train, l2, args.steps)
      acc, pairs = gold_accuracy(x_held @ w, gold)
      results.append({"lang": lang, "l2": l2, "gold_accuracy": acc, "pairs": pairs,
                      "train_prompts": len(train), "heldout_prompts": len(held)})
  print(json.dumps({"workdir": args.workdir, "steps": args.steps, "results": results}, indent=1))
  print("\n| lang | L2 | held-out gold accuracy | untied pairs |\n|---|---|---|---|")
  for r in results:
    print(f"| {r['lang']} | {r['l2']:g} | {r['gold_accuracy']:.3f} | {r['pairs']} |")


if __name__ == "__main__":
  main()
