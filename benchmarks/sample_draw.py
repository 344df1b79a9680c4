"""The sampler's draw over a real model's vocabulary: `jax.random.categorical` (a Gumbel
number for every vocabulary entry) against `infer.sampling.categorical_draw` (one uniform
number per row, a two-level inverse-CDF search), and the vocabulary projection of one decode
step beside them for scale. Both draws run on the same logits; medians after warm-up. Prints
one JSON object, then a short table; nothing is asserted.

  python benchmarks/sample_draw.py [--rows 16,32] [--vocabs 49152,262144] [--json_out F]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
from rlhf_jax.infer.sampling import categorical_draw  # noqa: E402

D_MODEL = {49152: 576, 262144: 640}  # SmolLM2-135M, Gemma 3 270M


def measure(rows: int, vocab: int, repeats: int) -> dict:
  d = D_MODEL.get(vocab, 640)
  key = jax.random.key(0)
  logits = 3.0 * jax.random.normal(key, (rows, vocab), jnp.float32)  # [B, V]
  table = jax.random.normal(key, (vocab, d), jnp.float32) * d ** -0.5  # [V, D] tied embedding
  hidden = jax.random.normal(key, (rows, d), jnp.float32)  # [B, D]
  gumbel = jax.jit(lambda k, l: jax.random.categorical(k, l, axis=-1))
  draw = jax.jit(categorical_draw)
  project = jax.jit(lambda h, e: h @ e.T)
  out = {"rows": rows, "vocab": vocab, "d_model": d}
  for name, fn in (("gumbel_s", lambda: gumbel(key, logits).block_until_ready()),
                   ("inverse_cdf_s", lambda: draw(key, logits).block_until_ready()),
                   ("projection_s", lambda: project(hidden, table).block_until_ready())):
    out[name] = round(common.median_seconds(fn, repeats)[0], 5)
  out["speedup"] = round(out["gumbel_s"] / out["inverse_cdf_s"], 2)
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--rows", default="16,32")
  p.add_argument("--vocabs", default="49152,262144")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--json_out", default="")
  args = p.parse_args()
  results = []
  for vocab in [int(v) for v in args.vocabs.split(",")]:
    for rows in [int(r) for r in args.rows.split(",")]:
      results.append(measure(rows, vocab, args.repeats))
  result = {"benchmark": "sample_draw", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": common.machine_info(), "jax": jax.__version__, "results": results}
  common.emit(result, args.json_out)
  print(common.markdown_table(
      ["rows", "vocab", "Gumbel (s)", "inverse CDF (s)", "speed-up", "projection (s)"],
      [[r["rows"], r["vocab"], r["gumbel_s"], r["inverse_cdf_s"], f"{r['speedup']}x",
        r["projection_s"]] for r in results]))


if __name__ == "__main__":
  main()
