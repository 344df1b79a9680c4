"""Train-step throughput and MFU of the next-token step, against this machine's matmul peak.

MFU only means something against a peak measured on the same machine in the same run, and on a
shared CPU the load changes from second to second: a peak timed once at the start and a step
timed a minute later can differ by 3x for reasons that have nothing to do with the model. So
the peak matmul (a jitted [n, n] @ [n, n] in the compute dtype, `common.jax_peak_matmuls`) is
timed between every two train steps, and MFU is the step's model FLOP/s over the median of
those interleaved peak timings. The step is the real jitted `rlhf_jax.train.lm.train_step`
(forward, backward, AdamW with the trainer's own defaults) on synthetic tokens.

Model FLOPs per step are 3x the forward matmul FLOPs (`ModelConfig.flops_per_token`): the
backward pass does two matmuls per forward one (gradients of inputs and of weights). Norms,
softmax, rotary and the optimizer are not counted, as usual for MFU.

  XLA_FLAGS= .venv/bin/python benchmarks/train_step.py [--size small] [--dtypes float32,bfloat16]

W2 (DESIGN.md) is `--size w1 --seq_len 128 --batch 16`; with `--peer_json` from
benchmarks/peers/torch_steps.py (the same step in a plain torch loop, run just before) the
float32 row also reports torch's step time over ours.

An SFT step at a pretrained model's shape (random weights, no download): `--model
gemma3_270m --lora_rank 16 --batch 8 --seq_len 128`; `--loss_share 0.39` trains one span per
row (lengths around that share of the row, as SFT's assistant turns), and `--loss_capacity
0,0.5` times the step with the output projection on every position and on half of them, the
loss positions gathered first (`data.loss_capacity`), one after the other in one process.

Prints one JSON object, then a Markdown table. Timings are never asserted.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from rlhf_jax.core import optim, sharding
from rlhf_jax.data.synthetic import SyntheticLMIterator  # noqa: E402
from rlhf_jax.models import model_config  # noqa: E402
from rlhf_jax.train import lm  # noqa: E402
from rlhf_jax.train.state import init_params_fn, create_train_state, param_count  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="small", help="a size from rlhf_jax/models/sizes.py")
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=0, help="0: the size's max_len, at most 256")
  p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, comma-separated")
  p.add_argument("--steps", type=int, default=10,
                 help="timed steps per dtype (after compiling and one warm-up step)")
  p.add_argument("--matmul_n", type=int, default=2048, help="side of the square peak matmul")
  p.add_argument("--model", default="",
                 help="a pretrained preset's shape (rlhf_jax/models/pretrained.py) instead of "
                      "--size/--vocab, random weights")
  p.add_argument("--lora_rank", type=int, default=0, help="LoRA rank (0: every parameter)")
  p.add_argument("--loss_share", type=float, default=0.0,
                 help="> 0: each row trains one span of about this share (0: every position)")
  p.add_argument("--loss_capacity", default="0",
                 help="data.loss_capacity settings to time, comma-separated (0: off)")
  p.add_argument("--peer_json", default="",
                 help="benchmarks/peers/torch_steps.py's JSON: the plain torch loop's W2 step, "
                      "for torch's step time / ours at float32 (--size w1 --seq_len 128 "
                      "--batch 16 only)")
  p.add_argument("--json_out", default="", help="also write the JSON object to this path")
  return p.parse_args(argv)


def loss_spans(batch: int, seq_len: int, share: float, seed: int = 2):
  """loss_mask [B, T]: one span per row of length uniform in [0.5, 1.5] x share x T, at a
  random offset (an assistant turn; 0 share: every position)."""
  if share <= 0:
    return np.ones((batch, seq_len), np.float32)
  rng = np.random.default_rng(seed)
  mask = np.zeros((batch, seq_len), np.float32)
  for row in range(batch):
    length = min(seq_len, max(1, round(rng.uniform(0.5, 1.5) * share * seq_len)))
    start = rng.integers(0, seq_len - length + 1)
    mask[row, start:start + length] = 1.0
  return mask


def build_step(size: str, dtype: str, batch: int, seq_len: int, vocab: int, model: str = "",
               lora_rank: int = 0, loss_share: float = 0.0, loss_capacity: float = 0.0):
  """(compiled step, initial state, a batch, model config, compile seconds) on one device."""
  config = common.lm_config(size, batch, seq_len, vocab, dtype, model, lora_rank)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rules = sharding.axis_rules(None)
  transformer = lm.build_model(config, vocab)
  schedule = optim.make_schedule(config.optim, config.train.steps)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  state, shardings = create_train_state(init_params_fn(transformer, seq_len), tx, mesh, rules, 0,
                                        split_lora=bool(lora_rank))
  data = SyntheticLMIterator(batch, seq_len, vocab, seed=1)
  local = next(data)
  local["loss_mask"] = loss_spans(batch, seq_len, loss_share)
  batch_arrays = sharding.make_global_batch(local, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = lm.make_jitted_step(transformer, tx, schedule, 1, shardings,
                               sharding.batch_sharding(mesh, rules), loss_capacity)
    start = time.perf_counter()
    compiled = step.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - start
  return compiled, state, batch_arrays, transformer.config, compile_s


def measure_train_step(size: str, dtype: str, batch: int, seq_len: int, vocab: int,
                       steps: int, matmul_n: int, **setting) -> dict:
  """Median step seconds and MFU, the peak matmul timed between every two steps. `setting`:
  build_step's model, lora_rank, loss_share, loss_capacity."""
  compiled, state, batch_arrays, cfg, compile_s = build_step(size, dtype, batch, seq_len, vocab,
                                                             **setting)
  peak_matmuls = common.jax_peak_matmuls(dtype, matmul_n)
  box = {"state": state}

  def one_step():
    box["state"], box["metrics"] = compiled(box["state"], batch_arrays)
    jax.block_until_ready(box)

  one_step()  # warm-up: first-run allocations
  step_times, matmul_times = [], {name: [] for name in peak_matmuls}
  for _ in range(steps):
    for name, matmul in peak_matmuls.items():
      matmul_times[name].append(common.timed(matmul))
    step_times.append(common.timed(one_step))

  tokens = batch * seq_len
  # LoRA's backward forms no weight gradient of the base: 2x the forward, not 3x. Counted at
  # every position, also where the projection runs on the gathered loss positions only.
  flops = (2.0 if setting.get("lora_rank") else 3.0) * cfg.flops_per_token(seq_len) * tokens
  step_s = statistics.median(step_times)
  peaks = {name: common.matmul_flops(matmul_n) / statistics.median(times)
           for name, times in matmul_times.items()}
  peak = max(peaks.values())
  return {"size": setting.get("model") or size, "dtype": dtype, "batch": batch,
          "seq_len": seq_len, "vocab": vocab, **setting,
          "loss_gathered": float(box["metrics"].get("train/loss_gathered", 0.0)),
          "params": param_count(box["state"].params), "compile_s": compile_s,
          "step_s": step_s, "tokens_per_s": tokens / step_s, "model_flops_per_step": flops,
          "model_flops_per_s": flops / step_s, "peak_flops_per_s": peak,
          "peak_by_form": peaks, "mfu": flops / step_s / peak,
          "final_loss": float(box["metrics"]["train/loss"]),
          "step_times_s": step_times, "matmul_times_s": matmul_times}


def markdown_table(result: dict) -> str:
  rows = ["| size | dtype | LoRA | loss share / capacity (gathered) | batch x seq | step (s) | "
          "tokens/s | model GFLOP/s | matmul peak GFLOP/s | MFU | torch / ours |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["results"]:
    ratio = f"{r['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in r else ""
    loss = (f"{r.get('loss_share', 0):g} / {r.get('loss_capacity', 0):g} "
            f"({'yes' if r.get('loss_gathered') else 'no'})")
    rows.append(f"| {r['size']} | {r['dtype']} | {r.get('lora_rank', 0)} | {loss} | "
                f"{r['batch']} x {r['seq_len']} | "
                f"{r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                f"{r['model_flops_per_s'] / 1e9:.1f} | {r['peak_flops_per_s'] / 1e9:.1f} | "
                f"{100 * r['mfu']:.1f}% | {ratio} |")
  return "\n".join(rows)


def main(argv=None):
  args = parse_args(argv)
  if args.model:
    args.vocab = common.model_vocab(args.model, args.vocab)
    cfg = lm.build_model(common.lm_config(args.size, args.batch, args.seq_len or 128, args.vocab,
                                          "float32", args.model), args.vocab).config
  else:
    cfg = model_config(args.size, vocab_size=args.vocab)
  seq_len = args.seq_len or min(cfg.max_len, 256)
  dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
  peer = None
  if args.peer_json:
    if (args.size, args.vocab) != ("w1", 8192):
      raise ValueError(f"--peer_json: torch ran W2 on the w1 model (vocab 8192), this run is "
                       f"{args.size} (vocab {args.vocab})")
    peer = common.torch_step_figure(args.peer_json, "w2", args.batch, seq_len)
  load_before = os.getloadavg()
  capacities = [float(c) for c in args.loss_capacity.split(",") if c.strip()]
  runs = [measure_train_step(args.size, dtype, args.batch, seq_len, args.vocab, args.steps,
                             args.matmul_n, model=args.model, lora_rank=args.lora_rank,
                             loss_share=args.loss_share, loss_capacity=capacity)
          for dtype in dtypes for capacity in capacities]
  result = {
      "benchmark": "train_step",
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "processor": common.cpu_name(),
                  "cpu_count": os.cpu_count(), "device": str(jax.devices()[0]),
                  "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]},
      "model": {"size": args.model or args.size, "flops_per_token_fwd": cfg.flops_per_token(seq_len),
                "params": cfg.param_count()},
      "matmul_peak": [{"dtype": r["dtype"], "n": args.matmul_n,
                       "flops_per_s": r["peak_flops_per_s"], "by_form": r["peak_by_form"]}
                      for r in runs],
      "results": runs,
  }
  if peer:
    result["peer"] = peer
    for r in runs:
      if r["dtype"] == "float32":
        r["speedup_vs_torch"] = peer["step_s"] / r["step_s"]
  common.emit(result, args.json_out)
  print()
  print(markdown_table(result))
  return result


if __name__ == "__main__":
  main()
