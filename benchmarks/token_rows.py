"""LoRA token rows in the chunked vocabulary projection: what training them costs.

One jitted value-and-gradient of the chunked next-token loss with respect to the hidden states
and the token rows, the embedding frozen (as in LoRA SFT), at a real model's vocabulary:

  none     no token rows: the floor
  columns  the rows as extra logit columns, h . rows added to those ids' logits (what
           `models/chunked.py` does)
  copy     the rows written into a copy of the embedding (`E.at[ids].add(rows)`), the earlier
           form: its backward forms a dense [V, D] gradient of the copy to read the rows' part

All three compute the same loss; medians after warm-up. Prints one JSON object, then a short
table; nothing is asserted.

  python benchmarks/token_rows.py [--tokens 1024] [--vocabs 49152,262144] [--json_out F]
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
from rlhf_jax.models import chunked  # noqa: E402

D_MODEL = {49152: 576, 262144: 640}  # SmolLM2-135M, Gemma 3 270M
CHUNK = 16384
IDS = (2, 105, 106)  # Gemma 3's template tokens; any three ids serve


def measure(tokens: int, vocab: int, repeats: int) -> dict:
  d = D_MODEL.get(vocab, 640)
  keys = jax.random.split(jax.random.key(0), 3)
  table = jax.random.normal(keys[0], (vocab, d), jnp.float32) * d ** -0.5  # [V, D], frozen
  hidden = jax.random.normal(keys[1], (tokens, d), jnp.float32)  # [N, D]
  targets = jax.random.randint(keys[2], (tokens,), 0, vocab)  # [N]
  rows = jnp.full((len(IDS), d), 0.01, jnp.float32)  # [n, D]
  ids = jnp.asarray(IDS, jnp.int32)
  mask = jnp.ones((tokens,), jnp.float32)

  def loss(h, r, form):
    if form == "copy":
      return chunked.next_token_loss(h, table.at[ids].add(r), targets, mask, chunk=CHUNK,
                                     vocab_axis=0)[0]
    extra = (ids, r) if form == "columns" else None
    return chunked.next_token_loss(h, table, targets, mask, chunk=CHUNK, vocab_axis=0,
                                   rows=extra)[0]

  out = {"tokens": tokens, "vocab": vocab, "d_model": d, "chunk": CHUNK}
  values = {}
  for form in ("none", "columns", "copy"):
    step = jax.jit(jax.value_and_grad(lambda h, r, f=form: loss(h, r, f), argnums=(0, 1)))
    values[form] = float(step(hidden, rows)[0])
    out[f"{form}_s"] = round(common.median_seconds(
        lambda: jax.block_until_ready(step(hidden, rows)), repeats)[0], 4)
  out["copy_over_columns"] = round(out["copy_s"] / out["columns_s"], 2)
  out["loss_columns_vs_copy_rel"] = abs(values["columns"] - values["copy"]) / abs(values["copy"])
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--tokens", default="1024", help="hidden states per step (8 x 128 in SFT)")
  p.add_argument("--vocabs", default="49152,262144")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json_out", default="")
  args = p.parse_args()
  results = [measure(int(n), int(v), args.repeats)
             for v in args.vocabs.split(",") for n in args.tokens.split(",")]
  result = {"benchmark": "token_rows", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": common.machine_info(), "jax": jax.__version__, "results": results}
  common.emit(result, args.json_out)
  print(common.markdown_table(
      ["tokens", "vocab", "no rows (s)", "rows as columns (s)", "rows in a copy (s)",
       "copy / columns"],
      [[r["tokens"], r["vocab"], r["none_s"], r["columns_s"], r["copy_s"],
        r["copy_over_columns"]] for r in results]))


if __name__ == "__main__":
  main()
