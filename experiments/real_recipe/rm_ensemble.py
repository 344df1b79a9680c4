r"""Do several reward models, averaged, order held-out answers as the gold scorer does better
than each alone?

Scores one held-out comparisons split with each RM run (its own tokenizer, layout, readout and
normalisation: `gain * raw + bias` puts every RM on its SFT answers' mean 0, std 1, so their
scores add), then reports the gold accuracy per language of each RM and of the mean of every
subset of two or more.

  python experiments/real_recipe/rm_ensemble.py \
      --rms workdirs/real-s16-head/rm,workdirs/s20-mean/rm \
      --data_dir workdirs/real-s16-head/comparisons/tfds --split validation
"""
import argparse
import itertools
import json

import numpy as np

from rlhf_jax.core import run_folder
from rlhf_jax.data.rm_batches import read_records
from rlhf_jax.eval import reward_model as evaluate_rm
from rlhf_jax.infer.rm_scores import load_reward_model


def normalised_scores(rm: str, records, data_dir: str) -> dict:
  """The encoded comparisons of `records` with the RM's normalised `scores` [N, K]."""
  model_config, params, gain, bias = load_reward_model(rm)
  data = run_folder.read_saved_config(rm)["data"]
  cat, _ = evaluate_rm.score_records(params, model_config, run_folder.tokenizer(rm), records,
                                     seq_len=data["seq_len"], max_answers=data["max_answers"],
                                     layout=data.get("layout", "answers"),
                                     row_len=data.get("row_len", 0))
  cat["scores"] = gain * cat["scores"] + bias
  return cat


def gold_accuracy(scores, cat, gold) -> dict:
  metrics, _ = evaluate_rm.comparison_metrics(scores, cat["valid"], cat["prefer"], cat["lang"],
                                              gold)
  return {k: round(v, 3) for k, v in metrics.items() if k.startswith("gold_accuracy")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rms", required=True, help="RM run folders, comma-separated")
  parser.add_argument("--data", default="rlhf_comparisons/round0")
  parser.add_argument("--data_dir", required=True, help="the comparisons' TFDS directory")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--json_out", default="")
  args = parser.parse_args()
  rms = args.rms.split(",")
  records = read_records(args.data, args.split, args.data_dir, 0)
  scored = {rm: normalised_scores(rm, records, args.data_dir) for rm in rms}
  cat = scored[rms[0]]
  k = cat["scores"].shape[1]
  gold = evaluate_rm.gold_scores(records, k)
  rows = []
  for n in range(1, len(rms) + 1):
    for subset in itertools.combinations(rms, n):
      mean = np.mean([scored[rm]["scores"] for rm in subset], axis=0)  # [N, K]
      rows.append({"rms": list(subset), **gold_accuracy(mean, cat, gold)})
      print(json.dumps(rows[-1]), flush=True)
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump({"split": args.split, "comparisons": len(records), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
