r"""Gold and proxy score against sqrt(KL) for PPO runs, per language (Gao et al.'s picture).

  .venv/bin/python experiments/ppo/plot_runs.py --out=experiments/ppo/gold_proxy_vs_kl.png \
      adaptive=workdirs/ppo_k8 beta0=workdirs/ppo_k8_beta0

Reads each run's held-out evaluations (eval/<lang>/{gold,proxy,kl,win_rate} in metrics.jsonl,
written every `eval.every` iterations by rlhf_jax/eval/ppo_periodic.py), plots them, and prints a
Markdown table of every evaluation.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from rlhf_jax.core.metrics import read_metrics  # noqa: E402

LANGS = ("en", "zh")


def evaluations(workdir: str) -> list[dict]:
  return [r for r in read_metrics(workdir)
          if any(f"eval/{lang}/gold" in r for lang in LANGS)]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="PNG path")
  p.add_argument("runs", nargs="+", help="label=workdir")
  args = p.parse_args(argv)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [tuple(r.split("=", 1)) for r in args.runs]
  fig, axes = plt.subplots(1, len(LANGS), figsize=(5 * len(LANGS), 3.6), squeeze=False)
  print("| run | iteration | lang | KL (nats) | √KL | gold (PPO / SFT) | proxy (PPO / SFT) | win rate |")
  print("|---|---|---|---|---|---|---|---|")
  for label, workdir in runs:
    rows = evaluations(workdir)
    for ax, lang in zip(axes[0], LANGS):
      rows_l = [r for r in rows if f"eval/{lang}/gold" in r]
      if not rows_l:
        continue
      # The SFT policy itself is the point at KL 0.
      d = [0.0] + [math.sqrt(max(r[f"eval/{lang}/kl"], 0.0)) for r in rows_l]
      gold = [rows_l[0][f"eval/{lang}/gold_sft"]] + [r[f"eval/{lang}/gold"] for r in rows_l]
      proxy = [rows_l[0][f"eval/{lang}/proxy_sft"]] + [r[f"eval/{lang}/proxy"] for r in rows_l]
      line, = ax.plot(d, gold, "o-", label=f"{label}: gold")
      ax.plot(d, proxy, "s--", color=line.get_color(), alpha=0.6, label=f"{label}: proxy")
      for r in rows_l:
        print(f"| {label} | {r['step']} | {lang} | {r[f'eval/{lang}/kl']:.2f} | "
              f"{math.sqrt(max(r[f'eval/{lang}/kl'], 0.0)):.2f} | "
              f"{r[f'eval/{lang}/gold']:.3f} / {r[f'eval/{lang}/gold_sft']:.3f} | "
              f"{r[f'eval/{lang}/proxy']:.2f} / {r[f'eval/{lang}/proxy_sft']:.2f} | "
              f"{r[f'eval/{lang}/win_rate']:.3f} |")
  for ax, lang in zip(axes[0], LANGS):
    ax.set_title({"en": "English", "zh": "Chinese"}[lang])
    ax.set_xlabel("√KL(policy ‖ SFT), nats^½")
    ax.set_ylabel("score (gold in [-1, 1]; proxy normalised)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
