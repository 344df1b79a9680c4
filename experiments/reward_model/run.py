r"""Reward model on the bundled data, end to end, and the K-wise vs independent-pairs ablation.

  .venv/bin/python experiments/reward_model/run.py --workdir=workdirs/rm_exp [--size=tiny]

Stages (each skipped when its output exists, so the command can be re-run):
  pretrain, sft    configs/pretrain.py, configs/sft.py at --size
  comparisons      K = 4 answers per prompt from the SFT model, gold-scored, graded by
                   annotators at 72.6% agreement (python -m rlhf_jax.recipe.comparisons)
  rm_kwise         configs/reward.py, loss kwise: B prompts x K answers per step
  rm_pairs         loss pairwise: the same comparisons as shuffled independent pairs, 2 answers
                   per element and B*K/2 elements per step, so a step costs the same compute
Both RMs train for --epochs passes over their own units and are evaluated every few steps on
the held-out comparisons; `results.json`, `curve.svg` (held-out accuracy against the gold
ordering vs answers processed) and a Markdown table are written to the workdir, and printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from rlhf_jax.config import util as config_util  # noqa: E402
from rlhf_jax.train import launch
from rlhf_jax.core.checkpoint import Checkpointer  # noqa: E402
from rlhf_jax.core.metrics import read_metrics  # noqa: E402

LANGS = ("en", "zh")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="workdirs/rm_exp")
  p.add_argument("--size", default="tiny")
  p.add_argument("--tokenizer", default="", help="a trained .model; '' trains one")
  p.add_argument("--bundled_data_dir", default="", help="prepared bundled TFDS datasets")
  p.add_argument("--pretrain_steps", type=int, default=400)
  p.add_argument("--sft_steps", type=int, default=200)
  p.add_argument("--lm_batch", type=int, default=32, help="pretrain / SFT rows per step")
  p.add_argument("--prompts_per_lang", type=int, default=1500)
  p.add_argument("--k", type=int, default=4)
  p.add_argument("--max_new_tokens", type=int, default=32)
  p.add_argument("--batch", type=int, default=32, help="RM prompts per step (kwise)")
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--lr", type=float, default=3e-4)
  p.add_argument("--eval_every", type=int, default=10)
  p.add_argument("--skip_pairs", action="store_true")
  p.add_argument("--answers", default="sft", choices=("sft", "corpus"),
                 help="sft: K answers sampled from the SFT model (the recipe); corpus: the "
                      "prompt's own human answer plus K-1 human answers to other prompts "
                      "(real text whose sentiment varies: what the RM can learn, apart from how "
                      "good the SFT model is)")
  return p.parse_args(argv)


def finished(stage_dir: str, steps: int | None = None) -> bool:
  directory = os.path.join(stage_dir, "checkpoints")
  if not os.path.isdir(directory):
    return False
  latest = Checkpointer(directory).latest_step()
  return latest is not None and (steps is None or latest == steps)


def lm_stage(name, args, tokenizer, data_dir, init_from=""):
  stage_dir = os.path.join(args.workdir, name)
  steps = args.pretrain_steps if name == "pretrain" else args.sft_steps
  if finished(stage_dir, steps):
    return stage_dir
  config = config_util.load_config(f"configs/{name}.py:size={args.size},steps={steps}")
  with config.unlocked():
    config.tokenizer.path = tokenizer
    config.data.data_dir = data_dir
    config.init_from = init_from
    config.data.batch_size = args.lm_batch
  launch.run(config, stage_dir)
  return stage_dir


def rm_stage(name, args, tokenizer, data_dir, sft_dir, loss, comparisons="round0"):
  stage_dir = os.path.join(args.workdir, name)
  k = args.k
  batch = args.batch if loss == "kwise" else args.batch * k // 2  # equal rows per step
  config = config_util.load_config(
      f"configs/reward.py:size={args.size},data=rlhf_comparisons/{comparisons},loss={loss},"
      f"batch={batch},k={k}")
  with config.unlocked():
    config.tokenizer.path = tokenizer
    config.data.data_dir = data_dir
    config.data.epochs = args.epochs
    config.data.batch_size = batch  # size=tiny would otherwise pick 8
    config.init_from = os.path.join(sft_dir, "checkpoints")
    config.optim.learning_rate = args.lr
    config.eval.every = args.eval_every
    config.eval.max_comparisons = 1000
    config.train.log_every = 5
    config.normalize.num_prompts = 256
    config.normalize.max_new_tokens = args.max_new_tokens
    config.normalize.batch_size = 64
  metrics = launch.run(config, stage_dir)
  rows_per_step = batch * (k if loss == "kwise" else 2)
  curve = [{"step": m["step"], "answers": m["step"] * rows_per_step,
            **{key: m[key] for key in m if key.startswith("eval/rm/")}}
           for m in read_metrics(stage_dir) if "eval/rm/gold_accuracy" in m]
  return {"name": name, "loss": loss, "batch": batch, "rows_per_step": rows_per_step,
          "final": {k_: v for k_, v in metrics.items() if k_.startswith(("eval/", "normalize/",
                                                                          "data/"))},
          "curve": curve}


def corpus_answers(data_dir: str, per_lang: int, k: int, seed: int):
  """(prompts, K answers each, langs) from human text: a dialogue's first question with its own
  answer and K-1 answers drawn from other dialogues of the language; Chinese dialogues are few,
  so Chinese also uses product reviews as prompts and as answers."""
  import numpy as np
  from rlhf_jax.data.rm_batches import read_records
  rng = np.random.default_rng(seed)
  items = {lang: [] for lang in LANGS}
  for split in ("train", "validation", "test"):
    for r in read_records("rlhf_dialogues", split, data_dir or None):
      msgs = r["messages"]
      if len(msgs) >= 2 and msgs[0]["role"] == "user" and msgs[1]["role"] == "assistant":
        items[r["lang"]].append((msgs[0]["content"], msgs[1]["content"]))
    for r in read_records("rlhf_prompts", split, data_dir or None):
      if r["lang"] == "zh" and r["source"] != "chatterbot" and len(r["prompt"]) <= 60:
        items["zh"].append((r["prompt"], r["prompt"]))  # a review "answered" by reviews
  prompts, answers, langs = [], [], []
  for lang in LANGS:
    pool = items[lang]
    for i in rng.permutation(len(pool))[:per_lang]:
      prompt, own = pool[i]
      others = [pool[j][1] for j in rng.choice(len(pool), k - 1, replace=False) if j != i]
      chosen = [own] + others if own != prompt else others + [pool[rng.integers(len(pool))][1]]
      prompts.append(prompt)
      answers.append(chosen[:k])
      langs.append(lang)
  return prompts, answers, langs


def svg_curve(runs, key="eval/rm/gold_accuracy", width=640, height=360) -> str:
  """A dependency-free line plot of `key` against answers processed, one line per run."""
  pad = 50
  points = [(p["answers"], p[key]) for r in runs for p in r["curve"] if key in p]
  if not points:
    return ""
  x_max = max(x for x, _ in points)
  y_lo = min(0.5, min(y for _, y in points))
  y_hi = max(y for _, y in points)

  def xy(x, y):
    return (pad + (width - 2 * pad) * x / x_max,
            height - pad - (height - 2 * pad) * (y - y_lo) / max(y_hi - y_lo, 1e-9))

  colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
           'stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
           f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle" font-size="12">'
           'answers processed (compute)</text>',
           f'<text x="12" y="{pad - 12}" font-size="12">{key}</text>']
  for frac in (0.0, 0.5, 1.0):
    y = y_lo + frac * (y_hi - y_lo)
    _, py = xy(0, y)
    parts.append(f'<text x="{pad - 6}" y="{py + 4}" text-anchor="end" font-size="10">'
                 f'{y:.2f}</text>')
  parts.append(f'<text x="{width - pad}" y="{height - pad + 14}" text-anchor="end" '
               f'font-size="10">{x_max:,}</text>')
  for i, r in enumerate(runs):
    pts = [xy(p["answers"], p[key]) for p in r["curve"] if key in p]
    color = colors[i % len(colors)]
    parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                 + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
    parts.append(f'<text x="{width - pad - 150}" y="{pad + 16 * i}" fill="{color}" '
                 f'font-size="12">{r["name"]} ({r["loss"]})</text>')
  parts.append("</svg>")
  return "\n".join(parts)


def table(runs) -> str:
  head = ["| run | loss | held-out acc. (labels) | gold acc. all | gold en | gold zh | best gold "
          "(at answers) |", "|---|---|---|---|---|---|---|"]
  for r in runs:
    f = r["final"]
    best = max(r["curve"], key=lambda p: p.get("eval/rm/gold_accuracy", 0), default={})
    head.append(f"| {r['name']} | {r['loss']} | {f.get('eval/rm/accuracy', float('nan')):.3f} | "
                f"{f.get('eval/rm/gold_accuracy', float('nan')):.3f} | "
                f"{f.get('eval/rm/gold_accuracy/en', float('nan')):.3f} | "
                f"{f.get('eval/rm/gold_accuracy/zh', float('nan')):.3f} | "
                f"{best.get('eval/rm/gold_accuracy', float('nan')):.3f} "
                f"({best.get('answers', 0):,}) |")
  return "\n".join(head)


def main(argv=None):
  args = parse_args(argv)
  launch.setup_logging()
  logging.basicConfig(level=logging.INFO)
  os.makedirs(args.workdir, exist_ok=True)
  data_dir = args.bundled_data_dir or ""
  tokenizer = args.tokenizer
  if not tokenizer:
    from rlhf_jax.text import tokenizer as tok_lib
    from rlhf_jax.train.inputs import tokenizer_corpus
    tokenizer = os.path.join(args.workdir, "tokenizer", "tokenizer.model")
    if not os.path.exists(tokenizer):
      os.makedirs(os.path.dirname(tokenizer), exist_ok=True)
      tok_lib.train_tokenizer(tokenizer_corpus(), tokenizer[:-len(".model")], 8192)
  pretrain = lm_stage("pretrain", args, tokenizer, data_dir)
  sft = lm_stage("sft", args, tokenizer, data_dir, os.path.join(pretrain, "checkpoints"))

  cmp_dir = os.path.join(args.workdir, "tfds")
  name = "round0" if args.answers == "sft" else "corpus"
  info_path = os.path.join(cmp_dir, "rlhf_comparisons", name, "comparisons_info.json")
  if not os.path.exists(info_path) and args.answers == "sft":
    from rlhf_jax.recipe import comparisons
    comparisons.main([f"--sft={sft}", f"--tokenizer={tokenizer}", f"--config={name}",
                      f"--data_dir={cmp_dir}", f"--prompts_data_dir={data_dir}",
                      f"--prompts_per_lang={args.prompts_per_lang}", f"--k={args.k}",
                      f"--max_new_tokens={args.max_new_tokens}", "--overwrite"])
  elif not os.path.exists(info_path):
    from rlhf_jax.recipe import comparisons
    from rlhf_jax.data import builders
    prompts, answers, langs = corpus_answers(data_dir, args.prompts_per_lang, args.k, 0)
    records, info = comparisons.build_records(prompts, answers, langs, source="corpus")
    builders.write_comparisons(records, config=name, data_dir=cmp_dir, overwrite=True)
    with open(info_path, "w") as f:
      json.dump(info, f, indent=1, ensure_ascii=False)
  with open(info_path) as f:
    info = json.load(f)

  suffix = "" if args.answers == "sft" else "_corpus"
  runs = [rm_stage("rm_kwise" + suffix, args, tokenizer, cmp_dir, sft, "kwise", name)]
  if not args.skip_pairs:
    runs.append(rm_stage("rm_pairs" + suffix, args, tokenizer, cmp_dir, sft, "pairwise", name))
  result = {"args": vars(args), "comparisons": info, "runs": runs}
  with open(os.path.join(args.workdir, f"results{suffix}.json"), "w") as f:
    json.dump(result, f, indent=1, ensure_ascii=False)
  with open(os.path.join(args.workdir, f"curve{suffix}.svg"), "w") as f:
    f.write(svg_curve(runs))
  print(json.dumps({"comparisons": info["langs"], "final": [r["final"] for r in runs]}, indent=1,
                   ensure_ascii=False))
  print()
  print(table(runs))
  return result


if __name__ == "__main__":
  main()
