"""The matmuls of one projection's training step, timed in each form a compute dtype can take.

A projection y = x·W ([M, K]·[K, F], M tokens) costs three matmuls per training step: the
forward product, the input gradient g·W^T and the weight gradient x^T·g, which contracts the
token axis. This script times each of them at the W1 workload's shapes (M = 16 x 80 tokens of
a PPO minibatch; the q/k/v/o, MLP and vocabulary projections) as:

  float32       what a float32 model runs (autodiff of a plain dot);
  bf16 default  autodiff of a bf16 dot with float32 accumulation (`preferred_element_type`),
                the textbook mixed-precision form;
  bf16 dense    `rlhf_jax.models.dot.dense`: the same, with its custom VJP.

and the whole forward + backward of each. It is the measurement behind dot.py's design: on a
CPU, XLA's bf16 kernels take a contraction only over the lhs's minor axis, so autodiff's
weight gradient runs as a float32 matmul wrapped in converts.

  XLA_FLAGS= .venv/bin/python benchmarks/matmul_forms.py [--tokens 1280] [--json_out FILE]

Prints one JSON object, then a Markdown table (GFLOP/s; medians). Timings are never asserted.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import common  # noqa: E402
from rlhf_jax.models.dot import dense  # noqa: E402

SHAPES = {"q/k/v/o": (256, 256), "MLP gate/up": (256, 1024), "MLP down": (1024, 256),
          "vocabulary": (256, 8192)}


def forms(dtype_name: str):
  """name -> f(x, w) -> y of each form (differentiable)."""
  if dtype_name == "float32":
    return {"float32": lambda x, w: x @ w}
  bf16 = jnp.bfloat16
  return {
      "bf16 default": lambda x, w: lax.dot(x.astype(bf16), w.astype(bf16),
                                           preferred_element_type=jnp.float32).astype(bf16),
      "bf16 dense": lambda x, w: dense(x, w, bf16),
  }


def time_form(fn, m: int, k: int, f: int, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, f)) / np.sqrt(k), jnp.float32)
  g = jnp.asarray(rng.standard_normal((m, f)), jnp.float32)
  cotangent_dtype = jax.eval_shape(fn, x, w).dtype
  gc = g.astype(cotangent_dtype)
  forward = jax.jit(fn)
  # Each backward matmul alone (the other operand held constant), then the whole vjp: the
  # forward product and both gradients, what one training step runs.
  input_grad = jax.jit(lambda x, w, g: jax.vjp(lambda x: fn(x, w), x)[1](g)[0])
  weight_grad = jax.jit(lambda x, w, g: jax.vjp(lambda w: fn(x, w), w)[1](g)[0])
  def step(x, w, g):
    y, vjp = jax.vjp(fn, x, w)
    return y, vjp(g)  # y returned, so the forward product is not dead code
  step = jax.jit(step)
  flops = 2 * m * k * f
  out = {}
  for name, call, n_matmuls in (("forward", lambda: forward(x, w), 1),
                                ("input grad", lambda: input_grad(x, w, gc), 1),
                                ("weight grad", lambda: weight_grad(x, w, gc), 1),
                                ("fwd+bwd", lambda: step(x, w, gc), 3)):
    seconds, _ = common.median_seconds(lambda: jax.block_until_ready(call()), repeats)
    out[name] = n_matmuls * flops / seconds
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tokens", type=int, default=1280, help="M: tokens of one minibatch")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  peaks = {d: common.jax_matmul_peak(d, args.matmul_n)["flops_per_s"]
           for d in ("float32", "bfloat16")}
  rows = []
  for shape_name, (k, f) in SHAPES.items():
    for dtype_name in ("float32", "bfloat16"):
      for form_name, fn in forms(dtype_name).items():
        rates = time_form(fn, args.tokens, k, f, args.repeats)
        rows.append({"projection": shape_name, "k": k, "f": f, "form": form_name,
                     "gflop_per_s": {n: r / 1e9 for n, r in rates.items()}})
  out = {"benchmark": "matmul_forms", "tokens": args.tokens,
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine": {**common.machine_info(), "jax": jax.__version__},
         "matmul_peak_gflop_per_s": {d: p / 1e9 for d, p in peaks.items()}, "results": rows}
  common.emit(out, args.json_out)
  print()
  parts = ("forward", "input grad", "weight grad", "fwd+bwd")
  print(common.markdown_table(
      ["projection", "M x K x F", "form", *parts],
      [[r["projection"], f"{args.tokens} x {r['k']} x {r['f']}", r["form"],
        *(f"{r['gflop_per_s'][p]:.0f}" for p in parts)] for r in rows]))
  print(f"\nGFLOP/s. Square {args.matmul_n}^3 matmul peak in the same run: float32 "
        f"{peaks['float32'] / 1e9:.0f}, bfloat16 {peaks['bfloat16'] / 1e9:.0f}.")


if __name__ == "__main__":
  main()
