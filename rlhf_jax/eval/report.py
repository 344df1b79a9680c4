r"""The report of a pipeline run: W/report.md with PNG plots in W/plots/, from what stages wrote.

  python -m rlhf_jax.eval.report --workdir=W

Read from the workdir: summary.json (stage times and lines, where each stage lives, the config,
the machine), each stage's metrics.jsonl, comparisons/info.json and evaluate/results.json. A
stage that did not run leaves its section saying so, so a partial run still gets a report.
Written to be read in a minute: the headline (PPO against SFT under the gold scorer) first,
then how each stage got there.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from typing import Sequence

LANGS = ("en", "zh")
POLICIES = ("sft", "ppo", "kto", "dpo")
HUMAN_AGREEMENT = 0.726  # InstructGPT's labelers; the simulated annotators are calibrated to it
PLOTS = ("win_rates.png", "losses.png", "rm_accuracy.png", "ppo_gold_vs_kl.png",
         "ppo_kl_beta.png")
# The losses plotted per stage: (metric, label).
LOSS_KEYS = {
    "pretrain": [("train/loss", "next-token loss")],
    "sft": [("train/loss", "assistant-token loss")],
    "rm": [("rm/loss", "ranking loss")],
    "ppo": [("ppo/loss/policy", "policy loss"), ("ppo/loss/value", "value loss")],
    "kto": [("kto/loss", "KTO loss")],
    "dpo": [("dpo/loss", "DPO loss")],
}


# ---------------------------------------------------------------------------------------------
# Reading the workdir.


def machine_info() -> dict:
  """Where the run happened: platform, CPUs, JAX devices and the versions that matter."""
  from importlib import metadata
  info = {"platform": platform.platform(), "python": sys.version.split()[0],
          "cpu_count": os.cpu_count()}
  try:
    import jax
    info["jax_backend"] = jax.default_backend()
    devices = jax.devices()
    info["jax_devices"] = f"{len(devices)} x {devices[0].device_kind}"
  except Exception as e:  # a report must not fail for want of a backend
    info["jax_devices"] = f"unavailable ({type(e).__name__})"
  versions = {}
  for package in ("rlhf_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                  "grain", "tensorflow-datasets", "sentencepiece"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = "not installed"
  info["versions"] = versions
  return info


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _metrics(stage_dir: str | None) -> list[dict]:
  """metrics.jsonl of a stage, one record per step (a resumed run's repeated steps: the last)."""
  from rlhf_jax.core.metrics import read_metrics
  if not stage_dir:
    return []
  by_step: dict = {}
  for r in read_metrics(stage_dir):
    by_step.setdefault(r["step"], {}).update(r)
  return [by_step[s] for s in sorted(by_step)]


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def _series(records: Sequence[dict], key: str) -> tuple[list, list]:
  pts = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
  return [p[0] for p in pts], [p[1] for p in pts]


def _last(records: Sequence[dict], key: str):
  values = _series(records, key)[1]
  return values[-1] if values else None


class Run:
  """The pieces of a finished (or partial) pipeline workdir the report is made of."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.summary = _read_json(os.path.join(workdir, "summary.json")) or {}
    self.stages = self.summary.get("stages", {})
    self.config = self.summary.get("config", {})
    self.langs = [l for l in str(self.config.get("langs", "en,zh")).split(",") if l] or LANGS
    self.metrics = {s: _metrics(self.stage_dir(s)) for s in LOSS_KEYS}
    self.results = _read_json(os.path.join(self.stage_dir("evaluate"), "results.json"))
    self.comparisons = _read_json(os.path.join(self.stage_dir("comparisons"), "info.json"))

  def stage_dir(self, stage: str) -> str:
    return self.stages.get(stage, {}).get("dir") or os.path.join(self.workdir, stage)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display needed).


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
      xs, ys = _series(records, key)
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


def rm_accuracy(run: Run) -> dict:
  """{lang: (accuracy vs the annotators' labels, vs the gold ordering, labelled pairs)}."""
  records = run.metrics["rm"]
  return {lang: (_last(records, f"eval/rm/accuracy/{lang}"),
                 _last(records, f"eval/rm/gold_accuracy/{lang}"),
                 _last(records, f"eval/rm/pairs/{lang}")) for lang in run.langs}


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


def ppo_curve(run: Run, lang: str) -> list[dict]:
  """Held-out evaluations of PPO: {step, sqrt_kl, gold, proxy, gold_sft} per evaluation."""
  out = []
  for r in run.metrics["ppo"]:
    if _finite(r.get(f"eval/{lang}/gold")):
      kl = r.get(f"eval/{lang}/kl", 0.0)
      out.append({"step": r["step"], "sqrt_kl": math.sqrt(max(kl if _finite(kl) else 0.0, 0.0)),
                  "gold": r[f"eval/{lang}/gold"], "proxy": r.get(f"eval/{lang}/proxy"),
                  "gold_sft": r.get(f"eval/{lang}/gold_sft")})
  return out


def plot_ppo_frontier(run: Run, path: str) -> None:
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
  curves = {lang: ppo_curve(run, lang) for lang in run.langs}
  for ax, what in zip(axes, ("gold", "proxy")):
    drawn = False
    for lang, curve in curves.items():
      pts = [(c["sqrt_kl"], c[what]) for c in curve if _finite(c[what])]
      if pts:
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lang)
        drawn = True
        if what == "gold" and _finite(curve[0]["gold_sft"]):
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
  xs, kl = _series(records, "objective/kl")
  if xs:
    ax.plot(xs, kl, color="tab:blue", label="KL (all)")
    for lang in run.langs:
      lx, ly = _series(records, f"objective/{lang}/kl")
      if lx:
        ax.plot(lx, ly, lw=0.8, alpha=0.7, label=f"KL {lang}")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("KL to SFT per answer (nats)")
    ax.legend(fontsize=7, loc="best")
    bx, beta = _series(records, "objective/kl_coef")
    if bx:
      twin = ax.twinx()
      twin.plot(bx, beta, color="tab:red", ls="--", label="beta")
      twin.set_ylabel("beta (KL coefficient)", color="tab:red")
  else:
    _empty(ax, "PPO did not run")
  ax.set_title("PPO: KL and beta over iterations")
  _save(fig, path)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Markdown.


def _f(x, digits: int = 3) -> str:
  return f"{x:.{digits}f}" if _finite(x) else "n/a"


def _one_line(text: str, limit: int = 160) -> str:
  text = " ".join(str(text).split()).replace("|", "\\|")
  return text if len(text) <= limit else text[:limit - 1] + "…"


def win_rate_table(results: dict) -> list[str]:
  """One row per language, one column per policy: win rate against SFT under the gold scorer."""
  policies = results["policies"]
  lines = ["| language | " + " | ".join(p.upper() for p in policies) + " |",
           "|---|" + "---|" * len(policies)]
  for lang in results["langs"]:
    lines.append(f"| {lang} | " + " | ".join(
        _f(results["metrics"][p][lang]["win_rate"]) for p in policies) + " |")
  return lines


def gold_table(results: dict) -> list[str]:
  policies = results["policies"]
  lines = ["| language | " + " | ".join(p.upper() for p in policies) + " |",
           "|---|" + "---|" * len(policies)]
  for lang in results["langs"]:
    cells = [results["metrics"][p][lang] for p in policies]
    lines.append(f"| {lang} | " + " | ".join(
        f"{_f(c['gold'])} ± {_f(c['gold_std'], 2)}" for c in cells) + " |")
  return lines


def _headline(run: Run) -> str:
  if not run.results:
    return "The evaluation stage has not run yet: no win rates."
  parts = []
  for name in run.results["policies"]:
    if name == "sft":
      continue
    rates = ", ".join(f"{lang} {_f(run.results['metrics'][name][lang]['win_rate'], 2)}"
                      for lang in run.results["langs"])
    parts.append(f"**{name.upper()}** wins {rates}")
  n = run.results.get("settings", {}).get("prompts_per_lang", {})
  count = ", ".join(f"{v} {k}" for k, v in n.items())
  return ("Against the SFT model on held-out prompts (" + count + "), judged by the gold "
          "scorer, a tie counting half: " + ("; ".join(parts) or "only SFT was evaluated")
          + ". 0.5 is a draw.")


def _stage_table(run: Run) -> list[str]:
  lines = ["| stage | status | time | result |", "|---|---|---|---|"]
  for stage in ("tokenizer", "pretrain", "sft", "comparisons", "rm", "ppo", "kto", "dpo",
                "evaluate"):
    s = run.stages.get(stage, {})
    status = s.get("status", "not run")
    if status == "ran":
      status = "done"
    elif status == "skipped":
      status = "done earlier"
    seconds = f"{s['seconds']:.0f} s" if _finite(s.get("seconds")) else ""
    lines.append(f"| {stage} | {status} | {seconds} | {_one_line(s.get('line', ''))} |")
  return lines


def _loss_table(run: Run) -> list[str]:
  lines = ["| stage | loss | first | last | steps |", "|---|---|---|---|---|"]
  for stage, keys in LOSS_KEYS.items():
    for key, label in keys:
      xs, ys = _series(run.metrics[stage], key)
      if xs:
        lines.append(f"| {stage} | {label} (`{key}`) | {_f(ys[0])} | {_f(ys[-1])} | {xs[-1]} |")
  return lines


def _rm_section(run: Run) -> list[str]:
  out = ["Held-out comparisons (prompts the RM never trained on): how often the RM prefers the "
         "answer the annotators preferred, and the answer the gold scorer prefers (the "
         f"annotators themselves agree with each other {HUMAN_AGREEMENT:.1%} of the time, as "
         "people do).", "",
         "| language | vs annotators | vs gold | labelled pairs | labels agree with gold |",
         "|---|---|---|---|---|"]
  langs_info = (run.comparisons or {}).get("langs", {})
  for lang, (acc, gold, pairs) in rm_accuracy(run).items():
    agree = langs_info.get(lang, {}).get("label_gold_agreement")
    out.append(f"| {lang} | {_f(acc)} | {_f(gold)} | {int(pairs) if _finite(pairs) else 'n/a'} "
               f"| {_f(agree)} |")
  out += ["", "![reward model accuracy](plots/rm_accuracy.png)"]
  return out


def _ppo_section(run: Run) -> list[str]:
  out = ["Held-out evaluations during PPO. Gold rising with √KL while the proxy (the RM) rises "
         "is real progress; proxy rising while gold falls is over-optimisation of the RM.", "",
         "![gold and proxy vs sqrt KL](plots/ppo_gold_vs_kl.png)", "",
         "| language | iteration | √KL | gold | proxy | SFT gold |", "|---|---|---|---|---|---|"]
  for lang in run.langs:
    for c in ppo_curve(run, lang):
      out.append(f"| {lang} | {c['step']} | {_f(c['sqrt_kl'], 2)} | {_f(c['gold'])} | "
                 f"{_f(c['proxy'])} | {_f(c['gold_sft'])} |")
  out += ["", "### KL and β over iterations", "", "![KL and beta](plots/ppo_kl_beta.png)"]
  return out


def _samples_section(run: Run) -> list[str]:
  if not run.results:
    return ["The evaluation stage has not run yet."]
  out = ["The same held-out prompts and sampling key for every policy; the gold score of each "
         "answer in brackets."]
  for lang in run.results["langs"]:
    out += ["", f"### {lang}"]
    for sample in run.results["samples"].get(lang, []):
      out += ["", f"**Prompt:** {_one_line(sample['prompt'])}", ""]
      for name, text in sample["answers"].items():
        out.append(f"- {name.upper()} ({_f(sample['gold'][name], 2)}): "
                   f"{_one_line(text) or '*(empty)*'}")
  return out


def _config_section(run: Run) -> list[str]:
  c = run.config
  if not c:
    return ["No summary.json: the run's config is unknown."]

  def steps(stage):
    return c.get(stage, {}).get("train", {}).get("steps", "n/a")

  ppo = c.get("ppo", {})
  epochs = c.get("rm", {}).get("data", {}).get("epochs", 1)  # the RM's length when steps = 0
  rm = steps("rm") or f"{epochs} epoch{'' if epochs == 1 else 's'}"
  ema = c.get("rm", {}).get("optim", {}).get("ema_decay", 0.0)
  if ema:
    rm += f" (ending on its moving average, decay {ema:g})"
  out = [f"size `{c.get('size')}`, languages `{c.get('langs')}`, seed {c.get('seed')}; steps: "
         f"pretrain {steps('pretrain')}, SFT {steps('sft')}, RM {rm}, "
         f"PPO {steps('ppo')}, KTO {steps('kto')}, DPO {steps('dpo')}; comparisons: "
         f"{c.get('comparisons', {}).get('prompts_per_lang')} prompts per language × "
         f"K={c.get('comparisons', {}).get('k')}; PPO β {ppo.get('kl', {}).get('coef')} "
         f"({'adaptive' if ppo.get('kl', {}).get('adaptive') else 'fixed'}).", "",
         "<details><summary>full config</summary>", "", "```json",
         json.dumps(c, indent=1, ensure_ascii=False, default=str), "```", "", "</details>"]
  return out


def _machine_section(run: Run) -> list[str]:
  m = run.summary.get("machine") or machine_info()
  versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())
  return [f"- platform: {m.get('platform')}, Python {m.get('python')}",
          f"- CPUs: {m.get('cpu_count')}; JAX backend {m.get('jax_backend')}: "
          f"{m.get('jax_devices')}", f"- versions: {versions}"]


SECTIONS = ("Stages", "Win rates against SFT", "Training losses", "Reward model accuracy",
            "PPO: gold and proxy score against √KL", "Sample answers", "Configuration",
            "Machine")


def render(run: Run) -> str:
  lines = [f"# RLHF pipeline report: {os.path.basename(os.path.abspath(run.workdir))}", "",
           _headline(run), "", f"## {SECTIONS[0]}", ""] + _stage_table(run)
  lines += ["", f"## {SECTIONS[1]}", ""]
  if run.results:
    lines += ["Win rate under the gold scorer (SFT against itself is 0.5 by construction):",
              ""] + win_rate_table(run.results)
    lines += ["", "Mean gold score ± std:", ""] + gold_table(run.results)
  else:
    lines.append("The evaluation stage has not run yet.")
  lines += ["", "![win rates](plots/win_rates.png)"]
  lines += ["", f"## {SECTIONS[2]}", "", "![losses](plots/losses.png)", ""] + _loss_table(run)
  lines += ["", f"## {SECTIONS[3]}", ""] + _rm_section(run)
  lines += ["", f"## {SECTIONS[4]}", ""] + _ppo_section(run)
  lines += ["", f"## {SECTIONS[5]}", ""] + _samples_section(run)
  lines += ["", f"## {SECTIONS[6]}", ""] + _config_section(run)
  lines += ["", f"## {SECTIONS[7]}", ""] + _machine_section(run)
  return "\n".join(lines) + "\n"


def write_report(workdir: str) -> str:
  """Builds W/report.md and W/plots/*.png from what the stages wrote; returns report.md's path."""
  run = Run(workdir)
  plots = os.path.join(workdir, "plots")
  os.makedirs(plots, exist_ok=True)
  for name, fn in zip(PLOTS, (plot_win_rates, plot_losses, plot_rm_accuracy, plot_ppo_frontier,
                              plot_ppo_kl)):
    fn(run, os.path.join(plots, name))
  path = os.path.join(workdir, "report.md")
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(render(run))
  os.replace(tmp, path)
  return path


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description="Writes W/report.md and W/plots/ of a pipeline run.")
  p.add_argument("--workdir", required=True)
  args = p.parse_args(argv)
  if not os.path.isdir(args.workdir):
    sys.exit(f"error: no workdir {args.workdir}")
  print(write_report(args.workdir))


if __name__ == "__main__":
  main()
