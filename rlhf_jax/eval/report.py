r"""The report of a pipeline run: W/report.md with PNG plots in W/plots/, from what stages wrote.

  python -m rlhf_jax.eval.report --workdir=W

Read from the workdir (eval/report_run.py): summary.json, each stage's metrics.jsonl,
comparisons/info.json and evaluate/results.json. A stage that did not run leaves its section
saying so, so a partial run still gets a report. Written to be read in a minute: first the
verdicts -- is each policy's win over SFT real, or collapse and reward hacking
(eval/report_verdicts.py)? -- then the raw win rates, then how each stage got there. Plots:
eval/report_plots.py.
"""
from __future__ import annotations

import json
import os
import platform
import sys

from rlhf_jax.eval import report_plots, report_verdicts
from rlhf_jax.eval.reward_model import best_of_n_kl
from rlhf_jax.eval.report_run import (HUMAN_AGREEMENT, LOSS_KEYS, Run, finite, fmt, one_line,
                                      ppo_curve, rm_accuracy, rm_best_of_n, rm_gold_gaps,
                                      series)

PLOTS = tuple(report_plots.PLOTTERS)


# ---------------------------------------------------------------------------------------------
# The machine.


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


# ---------------------------------------------------------------------------------------------
# Markdown.


def win_rate_table(results: dict) -> list[str]:
  """One row per language, one column per policy: win rate against SFT under the gold scorer."""
  policies = results["policies"]
  lines = ["| language | " + " | ".join(p.upper() for p in policies) + " |",
           "|---|" + "---|" * len(policies)]
  for lang in results["langs"]:
    lines.append(f"| {lang} | " + " | ".join(
        fmt(results["metrics"][p][lang]["win_rate"]) for p in policies) + " |")
  return lines


def gold_table(results: dict) -> list[str]:
  policies = results["policies"]
  lines = ["| language | " + " | ".join(p.upper() for p in policies) + " |",
           "|---|" + "---|" * len(policies)]
  for lang in results["langs"]:
    cells = [results["metrics"][p][lang] for p in policies]
    lines.append(f"| {lang} | " + " | ".join(
        f"{fmt(c['gold'])} ± {fmt(c['gold_std'], 2)}" for c in cells) + " |")
  return lines


def _headline(run: Run) -> str:
  """The gold win rates, each with its verdict beside it: a win is not read without it."""
  if not run.results:
    return "The evaluation stage has not run yet: no win rates."
  parts = []
  for name in run.results["policies"]:
    if name == "sft":
      continue
    rates = []
    for lang in run.results["langs"]:
      verdict = report_verdicts.verdict_of(run.results, name, lang)
      rates.append(f"{lang} {fmt(run.results['metrics'][name][lang]['win_rate'], 2)}"
                   + (f" (*{verdict}*)" if verdict else ""))
    parts.append(f"**{name.upper()}** wins {', '.join(rates)}")
  n = run.results.get("settings", {}).get("prompts_per_lang", {})
  count = ", ".join(f"{v} {k}" for k, v in n.items())
  tail = (" In brackets, the verdict: is the win real, collapse or reward hacking (next section)?"
          if report_verdicts.has_diagnostics(run.results) else "")
  return ("Against the SFT model on held-out prompts (" + count + "), judged by the gold "
          "scorer, a tie counting half: " + ("; ".join(parts) or "only SFT was evaluated")
          + ". 0.5 is a draw." + tail)


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
    seconds = f"{s['seconds']:.0f} s" if finite(s.get("seconds")) else ""
    lines.append(f"| {stage} | {status} | {seconds} | {one_line(s.get('line', ''))} |")
  return lines


def _loss_table(run: Run) -> list[str]:
  lines = ["| stage | loss | first | last | steps |", "|---|---|---|---|---|"]
  for stage, keys in LOSS_KEYS.items():
    for key, label in keys:
      xs, ys = series(run.metrics[stage], key)
      if xs:
        lines.append(f"| {stage} | {label} (`{key}`) | {fmt(ys[0])} | {fmt(ys[-1])} | {xs[-1]} |")
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
    out.append(f"| {lang} | {fmt(acc)} | {fmt(gold)} | {int(pairs) if finite(pairs) else 'n/a'} "
               f"| {fmt(agree)} |")
  gaps = rm_gold_gaps(run)
  if gaps:
    out += ["", "The same gold pairs in thirds by how far apart the gold scorer puts the two "
            "answers (its units; the closest third first): the RM's accuracy against gold, "
            "then how often the annotators' labels agree with gold there.", "",
            "| language | closest third | middle third | clearest third |", "|---|---|---|---|"]
    for lang, thirds in gaps.items():
      cells = [f"{fmt(acc)} / {fmt(labels)} (gap <= {fmt(hi)})" for acc, labels, hi in thirds]
      out.append(f"| {lang} | " + " | ".join(cells) + " |")
  bon = rm_best_of_n(run)
  if bon:
    sizes = sorted({n for wins in bon.values() for n, _ in wins})
    out += ["", "What the RM buys without training: of n SFT answers to a held-out prompt, the "
            "one the RM scores highest against one more SFT answer, gold win rate (0.5 at n = "
            "1). Best-of-n sits log n - (n-1)/n nats from SFT; PPO's gold win against SFT, in "
            "the verdicts, is the same kind of number at its own KL.", "",
            "| language | " + " | ".join(f"n = {n} (KL {best_of_n_kl(n):.2f})" for n in sizes)
            + " |", "|---" * (len(sizes) + 1) + "|"]
    for lang, wins in bon.items():
      got = dict(wins)
      out.append(f"| {lang} | " + " | ".join(fmt(got.get(n)) for n in sizes) + " |")
  out += ["", "![reward model accuracy](plots/rm_accuracy.png)"]
  return out


def _ppo_section(run: Run) -> list[str]:
  out = ["Held-out evaluations during PPO. Gold rising with √KL while the proxy (the RM) rises "
         "is real progress; proxy rising while gold falls is over-optimisation of the RM.", "",
         "![gold and proxy vs sqrt KL](plots/ppo_gold_vs_kl.png)", "",
         "| language | iteration | √KL | gold | proxy | SFT gold |", "|---|---|---|---|---|---|"]
  for lang in run.langs:
    for c in ppo_curve(run, lang):
      out.append(f"| {lang} | {c['step']} | {fmt(c['sqrt_kl'], 2)} | {fmt(c['gold'])} | "
                 f"{fmt(c['proxy'])} | {fmt(c['gold_sft'])} |")
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
      out += ["", f"**Prompt:** {one_line(sample['prompt'])}", ""]
      for name, text in sample["answers"].items():
        out.append(f"- {name.upper()} ({fmt(sample['gold'][name], 2)}): "
                   f"{one_line(text) or '*(empty)*'}")
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
  # With a pretrained model (config.model) pretraining is the model's own, unless continued.
  pretrain = (f"`{c['model']}`" if c.get("model") and not c.get("continue_pretraining")
              else steps("pretrain"))
  out = [f"size `{c.get('size')}`, languages `{c.get('langs')}`, seed {c.get('seed')}; steps: "
         f"pretrain {pretrain}, SFT {steps('sft')}, RM {rm}, "
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


SECTIONS = ("Verdicts: real gains or reward hacking?", "Stages", "Win rates against SFT",
            "Collapse and hacking diagnostics", "Training losses", "Reward model accuracy",
            "PPO: gold and proxy score against √KL", "Sample answers", "Configuration",
            "Machine")


def _win_rate_section(run: Run) -> list[str]:
  if not run.results:
    return ["The evaluation stage has not run yet.", "", "![win rates](plots/win_rates.png)"]
  return (["Win rate under the gold scorer (SFT against itself is 0.5 by construction):", ""]
          + win_rate_table(run.results) + ["", "Mean gold score ± std:", ""]
          + gold_table(run.results) + ["", "![win rates](plots/win_rates.png)"])


def render(run: Run) -> str:
  sections = [report_verdicts.verdict_section(run.results), _stage_table(run),
              _win_rate_section(run), report_verdicts.diagnostics_section(run.results),
              ["![losses](plots/losses.png)", ""] + _loss_table(run), _rm_section(run),
              _ppo_section(run), _samples_section(run), _config_section(run),
              _machine_section(run)]
  lines = [f"# RLHF pipeline report: {os.path.basename(os.path.abspath(run.workdir))}", "",
           _headline(run)]
  for title, body in zip(SECTIONS, sections):
    lines += ["", f"## {title}", ""] + body
  return "\n".join(lines) + "\n"


def write_report(workdir: str) -> str:
  """Builds W/report.md and W/plots/*.png from what the stages wrote; returns report.md's path."""
  run = Run(workdir)
  report_plots.write_plots(run, os.path.join(workdir, "plots"))
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
