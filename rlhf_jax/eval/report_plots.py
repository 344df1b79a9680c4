"""The report's PNG plots (matplotlib, Agg backend: no display needed).

Every plot is drawn whatever the run got to: a panel whose data is missing says so in grey, so
the report's image links never break.
"""
from __future__ import annotations

import os

from rlhf_jax.eval.policies import BASELINE
from rlhf_jax.eval.report_run import (HUMAN_AGREEMENT, LOSS_KEYS, Run, finite, ppo_curve,
                                      rm_accuracy, series)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> None:
  """Saved under a temporary name and renamed: a reader never sees half a PNG."""
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=90, bbox_inches="tight")
  os.replace(tmp, path)
  fig.clf()


def _empty(ax, text: str) -> None:
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
  ax.set_xticks([])
  ax.set_yticks([])


def plot_win_rates(run: Run, path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.2))
  if run.results:
    policies = run.results["policies"]
    width = 0.8 / len(policies)
    for i, name in enumerate(policies):
      values = [run.results["metrics"][name][lang]["win_rate"] for lang in run.results["langs"]]
      xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(values))]
      ax.bar(xs, values, width, label=name.upper())
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(run.results["langs"])), run.results["langs"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate vs SFT (gold)")
    ax.legend(fontsize=8)
  else:
    _empty(ax, "evaluate did not run")
  ax.set_title("Held-out win rate against SFT")
  _save(fig, path)
  plt.close(fig)


def gold_and_check_wins(results: dict | None) -> list[tuple[str, float, float | None]]:
  """[(label: policy, language and verdict; gold win; check-scorer win or None)] of every
  policy but SFT; empty when there is nothing to show (no evaluation, or one from before the
  diagnostics)."""
  if not results or "diagnostics" not in results:
    return []
  out = []
  for name in results["policies"]:
    if name == BASELINE:
      continue
    for lang in results["langs"]:
      d = results["diagnostics"].get(name, {}).get(lang, {})
      verdict = results.get("verdicts", {}).get(name, {}).get("langs", {}).get(lang, {})
      out.append((f"{name.upper()} {lang}\n{verdict.get('verdict', '')}",
                  results["metrics"][name][lang]["win_rate"], d.get("check_win")))
  return out


def plot_gold_vs_check(run: Run, path: str) -> None:
  """Gold and check-scorer win rate side by side per policy and language: a gain the second,
  independent scorer does not see is a gain on the gold scorer's quirks."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.2))
  bars = gold_and_check_wins(run.results)
  if bars:
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], 0.4, label="gold scorer")
    ax.bar([x + 0.2 for x in xs], [b[2] if finite(b[2]) else 0.0 for b in bars], 0.4,
           label="check scorer")
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("win rate vs SFT")
    ax.legend(fontsize=8, ncol=2, loc="upper center")
  else:
    _empty(ax, "evaluate did not run" if not run.results else "check-scorer win not computed")
  ax.set_title("Win rate against SFT: gold vs check scorer")
  _save(fig, path)
  plt.close(fig)


def plot_losses(run: Run, path: str) -> None:
  plt = _pyplot()
  stages = list(LOSS_KEYS)
  cols = 3
  rows = -(-len(stages) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
  for ax in axes.flat[len(stages):]:
    ax.axis("off")
  for ax, stage in zip(axes.flat, stages):
    records = run.metrics[stage]
    drawn = False
    for key, label in LOSS_KEYS[stage]:
      xs, ys = series(records, key)
      if xs:
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 20 else None)
        drawn = True
    if drawn:
      ax.set_xlabel("step")
      ax.legend(fontsize=7)
    else:
      _empty(ax, "not run")
    ax.set_title(stage)
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def plot_rm_accuracy(run: Run, path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.2))
  acc = rm_accuracy(run)
  if any(v[0] is not None or v[1] is not None for v in acc.values()):
    langs = list(acc)
    for i, (label, idx) in enumerate((("vs annotators", 0), ("vs gold", 1))):
      values = [acc[lang][idx] or 0.0 for lang in langs]
      ax.bar([j + (i - 0.5) * 0.38 for j in range(len(langs))], values, 0.38, label=label)
    ax.axhline(0.5, color="black", lw=0.8, ls="--", label="chance")
    ax.axhline(HUMAN_AGREEMENT, color="gray", lw=0.8, ls=":", label="people agree")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out pair accuracy")
    ax.legend(fontsize=7, loc="lower right")
  else:
    _empty(ax, "no held-out RM evaluation")
  ax.set_title("Reward model accuracy")
  _save(fig, path)
  plt.close(fig)


def plot_ppo_frontier(run: Run, path: str) -> None:
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
  curves = {lang: ppo_curve(run, lang) for lang in run.langs}
  for ax, what in zip(axes, ("gold", "proxy")):
    drawn = False
    for lang, curve in curves.items():
      pts = [(c["sqrt_kl"], c[what]) for c in curve if finite(c[what])]
      if pts:
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lang)
        drawn = True
        if what == "gold" and finite(curve[0]["gold_sft"]):
          ax.axhline(curve[0]["gold_sft"], color=line.get_color(), ls="--", lw=0.8)
    if drawn:
      ax.set_xlabel("sqrt(KL to SFT), nats^0.5")
      ax.set_ylabel(f"{what} score")
      ax.legend(fontsize=8)
    else:
      _empty(ax, "PPO did not run")
    ax.set_title(f"PPO {what} score vs sqrt(KL)" + (" (dashed: SFT)" if what == "gold" else ""))
  fig.tight_layout()
  _save(fig, path)
  plt.close(fig)


def plot_ppo_kl(run: Run, path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.2))
  records = run.metrics["ppo"]
  xs, kl = series(records, "objective/kl")
  if xs:
    ax.plot(xs, kl, color="tab:blue", label="KL (all)")
    for lang in run.langs:
      lx, ly = series(records, f"objective/{lang}/kl")
      if lx:
        ax.plot(lx, ly, lw=0.8, alpha=0.7, label=f"KL {lang}")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("KL to SFT per answer (nats)")
    ax.legend(fontsize=7, loc="best")
    # One beta, or one per language (kl.coef_by_lang): each language's own line.
    betas = [(f"beta {lang}", series(records, f"objective/{lang}/kl_coef"), style)
             for lang, style in zip(run.langs, ("--", ":", "-."))]
    betas = [b for b in betas if b[1][0]] or [("beta", series(records, "objective/kl_coef"), "--")]
    if betas[0][1][0]:
      twin = ax.twinx()
      for label, (bx, beta), style in betas:
        twin.plot(bx, beta, color="tab:red", ls=style, label=label)
      twin.set_ylabel("beta (KL coefficient)", color="tab:red")
      if len(betas) > 1:
        twin.legend(fontsize=7, loc="lower right")
  else:
    _empty(ax, "PPO did not run")
  ax.set_title("PPO: KL and beta over iterations")
  _save(fig, path)
  plt.close(fig)


# File name -> the function drawing it, in the report's order.
PLOTTERS = {"win_rates.png": plot_win_rates, "win_rates_gold_vs_check.png": plot_gold_vs_check,
            "losses.png": plot_losses, "rm_accuracy.png": plot_rm_accuracy,
            "ppo_gold_vs_kl.png": plot_ppo_frontier, "ppo_kl_beta.png": plot_ppo_kl}


def write_plots(run: Run, plots_dir: str) -> None:
  os.makedirs(plots_dir, exist_ok=True)
  for name, fn in PLOTTERS.items():
    fn(run, os.path.join(plots_dir, name))
