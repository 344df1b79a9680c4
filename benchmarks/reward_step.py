"""Reward-model train step: comparisons/s, pairs/s and MFU, against a matmul timed in the same run.

Two layouts of the same jitted step (`rlhf_jax.train.reward.train_step`: forward, backward,
AdamW, the trainer's optimizer defaults), each on full-length rows:
  kwise  B prompts x K answers: one forward pass per answer, all C(K, 2) pairs of a prompt
         from those K scores (K = 4: 6 pairs for 4 passes);
  pairs  B pairs as K = 2 elements: workload W3 of DESIGN.md (16 pairs x 128 tokens), the
         layout TRL's RewardTrainer uses (20.4 pairs/s plain torch, 19.6 TRL, same CPU).
  shared B prompts x K answers in data.layout='shared_prompt': one row per prompt, its first
         --prompt_len tokens once and then K answers of seq_len - prompt_len tokens each, so the
         same K rows of seq_len as kwise (and pairs, K = 2) from fewer positions.
`--model smollm2_135m --lora_rank 16` times a pretrained preset's shape (random weights) with
the pipeline's LoRA.
Model FLOPs per step are 3x the forward matmul FLOPs of every answer row with no vocabulary
projection (the RM has none); MFU divides their rate by the f32 (or bf16) matmul rate measured
here, so it means the same on a loaded machine. These are the workload's FLOPs: the shared
layout and the last layer at the scored tokens only execute fewer, so MFU reads above the
cores' own rate (past 100% when the peak's reading is low).

  XLA_FLAGS= .venv/bin/python benchmarks/reward_step.py [--size small] [--dtypes float32,bfloat16]
      [--peer_json TORCH.json]

With `--size w1 --peer_json` (benchmarks/peers/torch_steps.py's JSON, run just before) the
float32 pairs:16x2 row, W3, also reports the plain torch loop's step time over ours.

Prints one JSON object, then a Markdown table. Timings are never asserted.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from rlhf_jax.core import optim, sharding
from rlhf_jax.models import ScalarModel  # noqa: E402
from rlhf_jax.train import reward as rm  # noqa: E402
from rlhf_jax.train.state import init_params_fn, create_train_state, param_count  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="small", help="a size from rlhf_jax/models/sizes.py")
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--layouts", default="kwise:8x4,pairs:16x2,shared:16x2",
                 help="name:BxK, comma-separated (B elements of K answers)")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--steps", type=int, default=8, help="timed steps per case (after compile)")
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--matmul_repeats", type=int, default=10)
  p.add_argument("--model", default="",
                 help="a pretrained preset's shape (rlhf_jax/models/pretrained.py), random weights")
  p.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0: every parameter)")
  p.add_argument("--prompt_len", type=int, default=64,
                 help="the shared layout's prompt tokens of each seq_len row")
  p.add_argument("--peer_json", default="",
                 help="benchmarks/peers/torch_steps.py's JSON: the plain torch loop's W3 step, "
                      "for torch's step time / ours on the float32 pairs:16x2 row (--size w1)")
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


def shared_rows(b: int, k: int, t: int, prompt_len: int, vocab: int, rng) -> dict:
  """The shared_prompt layout of K full-length rows of t tokens whose first prompt_len are one
  prompt: [B, prompt_len + K (t - prompt_len)] (data/rm_batches.py)."""
  answer = t - prompt_len
  row = prompt_len + k * answer
  segment = np.concatenate([np.ones(prompt_len, np.int32)] +
                           [np.full(answer, 2 + i, np.int32) for i in range(k)])
  positions = np.concatenate([np.arange(prompt_len)] + [np.arange(prompt_len, t)] * k)
  return {"tokens": rng.integers(1, vocab, (b, row)).astype(np.int32),
          "positions": np.broadcast_to(positions.astype(np.int32), (b, row)).copy(),
          "segment_ids": np.broadcast_to(segment, (b, row)).copy(),
          "prefix_ids": np.broadcast_to((segment > 1).astype(np.int32), (b, row)).copy(),
          "score_at": np.broadcast_to(prompt_len + answer * np.arange(1, k + 1) - 1,
                                      (b, k)).astype(np.int32).copy()}


def random_batch(b: int, k: int, t: int, vocab: int, seed: int, prompt_len: int = 0) -> dict:
  """Full-length rows; answer i of an element preferred to every later one (a full ranking).
  prompt_len > 0: the shared_prompt layout of the same rows."""
  rng = np.random.default_rng(seed)
  prefer = np.triu(np.ones((k, k), np.float32), 1)
  rows = (shared_rows(b, k, t, prompt_len, vocab, rng) if prompt_len else
          {"tokens": rng.integers(1, vocab, (b, k, t)).astype(np.int32),
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, k, t)).copy(),
           "segment_ids": np.ones((b, k, t), np.int32)})
  return {**rows,
          "valid": np.ones((b, k), np.float32),
          "prefer": np.broadcast_to(prefer, (b, k, k)).copy(),
          "margin": np.zeros((b, k, k), np.float32),
          "label": np.zeros((b, k), np.float32), "labeled": np.zeros((b, k), np.float32),
          "lang": np.zeros((b,), np.int32)}


def measure_step(size: str, dtype: str, layout: str, b: int, k: int, seq_len: int, vocab: int,
                 steps: int, model: str = "", lora_rank: int = 0, prompt_len: int = 0) -> dict:
  config = common.lm_config(size, b, seq_len, vocab, dtype, model, lora_rank)
  config.optim.weight_decay = 0.0
  cfg = rm.build_model_config(config, vocab)
  scalar_model = ScalarModel(cfg)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rules = sharding.axis_rules(None)
  schedule = optim.make_schedule(config.optim, 1000)
  tx = optim.make_optimizer(config.optim, 1000)
  state, shardings = create_train_state(init_params_fn(scalar_model, seq_len), tx, mesh, rules, 0,
                                        split_lora=bool(lora_rank))
  shared = prompt_len if layout == "shared" else 0
  batches = [sharding.make_global_batch(random_batch(b, k, seq_len, vocab, s, shared), mesh,
                                        rules) for s in range(2)]
  batch_shardings = {key: sharding.batch_sharding(mesh, rules, v.ndim)
                     for key, v in batches[0].items()}
  reduction = "pair" if layout == "pairs" else "prompt"
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = rm.make_jitted_step(scalar_model, tx, schedule, "ranking", reduction, 1, shardings,
                               batch_shardings)
    start = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    box = {"state": state, "i": 0}

    def one_step():
      box["state"], metrics = compiled(box["state"], batches[box["i"] % 2])
      box["i"] += 1
      jax.block_until_ready((box["state"], metrics))
      box["loss"] = metrics["rm/loss"]

    seconds, times = common.median_seconds(one_step, steps)
  rows = b * k
  # The K rows' model FLOPs (3x forward; 2x with LoRA: no weight gradient of the base), in
  # either layout: the shared one does the same work from fewer positions. The step executes
  # fewer still: the last layer runs at each answer's scored token only (q, o, attention and
  # MLP; keys and values everywhere), 22% of the w1 model's FLOPs at 128 tokens.
  passes = 2.0 if lora_rank else 3.0
  flops = passes * cfg.flops_per_token(seq_len, with_logits=False) * rows * seq_len
  pairs = b * math.comb(k, 2)
  return {"layout": layout, "size": model or size, "dtype": dtype, "elements": b, "k": k,
          "seq_len": seq_len, "prompt_len": shared, "lora_rank": lora_rank,
          "positions": int(batches[0]["segment_ids"].size),
          "params": param_count(state.params), "compile_s": compile_s,
          "step_s": seconds, "step_s_min": min(times), "step_s_max": max(times),
          "comparisons_per_s": b / seconds, "pairs_per_s": pairs / seconds,
          "answers_per_s": rows / seconds, "tokens_per_s": rows * seq_len / seconds,
          "model_flops_per_step": flops, "model_flops_per_s": flops / seconds,
          "final_loss": float(box["loss"])}


def markdown_table(result: dict) -> str:
  rows = ["| layout | dtype | elements x K x T | positions | step (s) | comparisons/s | pairs/s | "
          "model GFLOP/s | peak GFLOP/s | MFU | torch / ours |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["results"]:
    ratio = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else ""
    rows.append(f"| {r['layout']} | {r['dtype']} | {r['elements']} x {r['k']} x {r['seq_len']} | "
                f"{r.get('positions', '')} | "
                f"{r['step_s']:.3f} | {r['comparisons_per_s']:.1f} | {r['pairs_per_s']:.1f} | "
                f"{r['model_flops_per_s'] / 1e9:.1f} | {r['peak_flops_per_s'] / 1e9:.1f} | "
                f"{100 * r['mfu']:.1f}% | {ratio} |")
  return "\n".join(rows)


def main(argv=None):
  args = parse_args(argv)
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  args.vocab = common.model_vocab(args.model, args.vocab)
  layouts = []
  for item in filter(None, args.layouts.split(",")):
    name, shape = item.split(":")
    b, k = (int(x) for x in shape.split("x"))
    layouts.append((name, b, k))
  peer = None
  if args.peer_json:
    if (args.size, args.vocab) != ("w1", 8192):
      raise ValueError(f"--peer_json: torch ran W3 on the w1 model (vocab 8192), this run is "
                       f"{args.size} (vocab {args.vocab})")
    peer = common.torch_step_figure(args.peer_json, "w3", 2 * 16, args.seq_len)
  load_before = os.getloadavg()[0]
  peaks = {d: common.jax_matmul_peak(d, args.matmul_n, args.matmul_repeats) for d in dtypes}
  runs = []
  for name, b, k in layouts:
    for dtype in dtypes:
      r = measure_step(args.size, dtype, name, b, k, args.seq_len, args.vocab, args.steps,
                       args.model, args.lora_rank, args.prompt_len)
      r["peak_flops_per_s"] = peaks[dtype]["flops_per_s"]
      r["mfu"] = r["model_flops_per_s"] / r["peak_flops_per_s"]
      runs.append(r)
  cfg = rm.build_model_config(common.lm_config(args.size, 1, args.seq_len, args.vocab, "float32",
                                               args.model, args.lora_rank), args.vocab)
  result = {
      "benchmark": "reward_step",
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": {**common.machine_info(), "device": str(jax.devices()[0]),
                  "jax": jax.__version__, "loadavg_1m_before_after": [load_before,
                                                                      os.getloadavg()[0]]},
      "model": {"size": args.model or args.size,
                "flops_per_token_fwd_no_logits": cfg.flops_per_token(args.seq_len, False)},
      "matmul_peak": list(peaks.values()),
      "results": runs,
  }
  if peer:  # torch's W3 is 16 pairs, chosen and rejected rows in one batch: our pairs:16x2
    result["peer"] = peer
    for r in runs:
      # shared:16x2 is the same 16 pairs with their prompt computed once
      if (r["layout"] in ("pairs", "shared") and (r["elements"], r["k"], r["dtype"]) ==
          (16, 2, "float32")):
        r["speedup_vs_torch"] = peer["step_s"] / r["step_s"]
  common.emit(result, args.json_out)
  print()
  print(markdown_table(result))
  return result


if __name__ == "__main__":
  main()
