"""What the report reads from a pipeline workdir, and the number formatting its tables share.

Read: summary.json (stage times and lines, where each stage lives, the config, the machine),
each stage's metrics.jsonl, comparisons/info.json and evaluate/results.json. Anything missing
reads as empty, so a partial run still gets a report (rlhf_jax/eval/report.py).
"""
from __future__ import annotations

import math
import os
from rlhf_jax.core.langs import LANGS
from typing import Sequence
from rlhf_jax.core import metrics
from rlhf_jax.core.metrics import read_metrics
from rlhf_jax.eval.reward_model import best_of_n_found

HUMAN_AGREEMENT = 0.726  # InstructGPT's labelers; the simulated annotators are calibrated to it
# The losses plotted per stage: (metric, label).
LOSS_KEYS = {
    "pretrain": [("train/loss", "next-token loss")],
    "sft": [("train/loss", "assistant-token loss")],
    "rm": [("rm/loss", "ranking loss")],
    "ppo": [("ppo/loss/policy", "policy loss"), ("ppo/loss/value", "value loss")],
    "kto": [("kto/loss", "KTO loss")],
    "dpo": [("dpo/loss", "DPO loss")],
}


def read_json(path: str):
  """The JSON object in `path`, or None when there is none; FileContentError naming the file
  when it is not one."""
  if not os.path.exists(path):
    return None
  return metrics.read_json(path)


def stage_metrics(stage_dir: str | None) -> list[dict]:
  """metrics.jsonl of a stage, one record per step (a resumed run's repeated steps: the last)."""
  if not stage_dir:
    return []
  by_step: dict = {}
  for r in read_metrics(stage_dir):
    by_step.setdefault(r["step"], {}).update(r)
  return [by_step[s] for s in sorted(by_step)]


def finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def series(records: Sequence[dict], key: str) -> tuple[list, list]:
  pts = [(r["step"], r[key]) for r in records if finite(r.get(key))]
  return [p[0] for p in pts], [p[1] for p in pts]


def last(records: Sequence[dict], key: str):
  values = series(records, key)[1]
  return values[-1] if values else None


class Run:
  """The pieces of a finished (or partial) pipeline workdir the report is made of."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.summary = read_json(os.path.join(workdir, "summary.json")) or {}
    self.stages = self.summary.get("stages", {})
    self.config = self.summary.get("config", {})
    self.langs = [l for l in str(self.config.get("langs", "en,zh")).split(",") if l] or LANGS
    self.metrics = {s: stage_metrics(self.stage_dir(s)) for s in LOSS_KEYS}
    self.results = read_json(os.path.join(self.stage_dir("evaluate"), "results.json"))
    self.comparisons = read_json(os.path.join(self.stage_dir("comparisons"), "info.json"))

  def stage_dir(self, stage: str) -> str:
    return self.stages.get(stage, {}).get("dir") or os.path.join(self.workdir, stage)


def rm_accuracy(run: Run) -> dict:
  """{lang: (accuracy vs the annotators' labels, vs the gold ordering, labelled pairs)}."""
  records = run.metrics["rm"]
  return {lang: (last(records, f"eval/rm/accuracy/{lang}"),
                 last(records, f"eval/rm/gold_accuracy/{lang}"),
                 last(records, f"eval/rm/pairs/{lang}")) for lang in run.langs}


def rm_gold_gaps(run: Run) -> dict:
  """{lang: [(RM gold accuracy, labels' agreement with gold, largest gap)] per third of the
  held-out gold pairs, closest first} (eval/reward_model.py `gold_gap_bins`); {} if none."""
  records = run.metrics["rm"]
  out = {}
  for lang in run.langs:
    thirds = [tuple(last(records, f"eval/rm/gold_gap{b}_{what}/{lang}")
                    for what in ("accuracy", "labels", "hi")) for b in (1, 2, 3)]
    if all(finite(t[0]) for t in thirds):
      out[lang] = thirds
  return out


def rm_best_of_n(run: Run) -> dict:
  """{lang: [(n, gold win of the RM's best of n SFT answers against another)]}, n ascending,
  at the RM's last held-out evaluation (eval/reward_model.py `best_of_n_win`); {} if none."""
  records = run.metrics["rm"]
  out = {}
  for lang in run.langs:
    sizes = best_of_n_found({k for r in records for k in r}, lang, prefix="eval/rm/")
    wins = [(n, last(records, f"eval/rm/gold_bon{n}_win/{lang}")) for n in sizes]
    if wins:
      out[lang] = wins
  return out


def ppo_curve(run: Run, lang: str) -> list[dict]:
  """Held-out evaluations of PPO: {step, sqrt_kl, gold, proxy, gold_sft} per evaluation."""
  out = []
  for r in run.metrics["ppo"]:
    if finite(r.get(f"eval/{lang}/gold")):
      kl = r.get(f"eval/{lang}/kl", 0.0)
      out.append({"step": r["step"], "sqrt_kl": math.sqrt(max(kl if finite(kl) else 0.0, 0.0)),
                  "gold": r[f"eval/{lang}/gold"], "proxy": r.get(f"eval/{lang}/proxy"),
                  "gold_sft": r.get(f"eval/{lang}/gold_sft")})
  return out


def fmt(x, digits: int = 3) -> str:
  return f"{x:.{digits}f}" if finite(x) else "n/a"


def one_line(text: str, limit: int = 160) -> str:
  """A text fit for one Markdown table cell: whitespace collapsed, pipes escaped, cut."""
  text = " ".join(str(text).split()).replace("|", "\\|")
  return text if len(text) <= limit else text[:limit - 1] + "…"
