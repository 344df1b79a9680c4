"""Sampler speed: decode tokens/s, and whether a decode step's cost is flat in its position.

For each compute dtype it times
  * `generate` end to end (prefill + while_loop decode to the full budget, no stop ids), and
  * one jitted decode step on a cache whose next slot is 32, then 512 (same cache length):
    a KV cache makes a step read the cache, not recompute the prefix, so the ratio should be
    near 1 (goal <= 1.5).
Prints one JSON object, then a short table. Timings are medians after warm-up; nothing is
asserted.

  python benchmarks/generate.py [--size small] [--batch 16] [--dtype both|float32|bfloat16]
      [--layers unrolled,scanned]

--size also takes a pretrained shape (gemma3_270m, smollm2_135m: random weights of that shape).
--layers times each layout of the layers (models/layer_layout.py): unrolled, or under nn.scan.

--peer transformers also times `transformers`' `model.generate` (torch, CPU) on the same weights
(exported with rlhf_jax.export.hf_export and loaded back) at the same batch, prompt and length:
sampling at temperature 1 with top-k and top-p off on both sides, no stop ids
(min_new_tokens = max_new_tokens), float32, torch with one thread per core. The two are timed
alternately, one call each per round after a warm-up (ours: the compile), so a change in load
hits both alike; the result holds the medians and transformers' time over ours.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from rlhf_jax.models import Transformer, init_cache  # noqa: E402
from rlhf_jax.infer.sampling import (SamplingParams, decode_compiler_options, decode_step,  # noqa: E402
                                    make_generate_fn, prefill)


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="small")
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--dtype", default="both", choices=["both", "float32", "bfloat16"])
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=64, help="decode budget for generate")
  p.add_argument("--cache_len", type=int, default=640, help="slots for the step timing")
  p.add_argument("--positions", default="32,512", help="two cache indices to compare")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--layers", default="unrolled",
                 help="comma-separated layouts to time: unrolled, scanned")
  p.add_argument("--peer", default="", choices=["", "transformers"],
                 help="also time transformers' generate on the same weights (float32)")
  p.add_argument("--peer_rounds", type=int, default=3, help="alternating timed rounds")
  p.add_argument("--json_out", default="", help="also write the JSON object to this path")
  return p.parse_args()


def init_params(cfg, seed: int = 0):
  """Random params of the model's tree, drawn in numpy: values do not matter for speed, and
  this skips compiling the initialiser."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens, tokens,
                                        tokens))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(0.0, 0.02, s.shape), jnp.float32), shapes)


def time_generate(cfg, params, args) -> dict:
  """End-to-end generate: prefill of prompt_len, then new_tokens decode steps per row."""
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(1, cfg.vocab_size, (args.batch, args.prompt_len)), jnp.int32)
  mask = jnp.ones_like(tokens)
  fn = make_generate_fn(cfg, args.new_tokens, (), 0, SamplingParams(temperature=1.0))
  start = time.perf_counter()
  jax.block_until_ready(fn(params, tokens, mask, jax.random.key(0)))
  compile_s = time.perf_counter() - start
  repeats = max(3, args.repeats // 4)
  seconds, _ = common.median_seconds(
      lambda: jax.block_until_ready(fn(params, tokens, mask, jax.random.key(1))), repeats, 1)
  # The prefill alone, on a cache of the same size, to split decode time from prompt time.
  run_prefill = jax.jit(functools.partial(prefill, model_config=cfg))
  cache = init_cache(cfg, args.batch, args.prompt_len + args.new_tokens)
  prefill_s, _ = common.median_seconds(
      lambda: jax.block_until_ready(run_prefill(params, tokens, mask, cache)), repeats, 1)
  # generate samples the first token from the prefill's logits: new_tokens - 1 decode steps.
  decode_steps = args.new_tokens - 1
  return {"generate_s": seconds, "generate_compile_s": compile_s, "prefill_s": prefill_s,
          "tokens_per_s": args.batch * args.new_tokens / seconds,
          "decode_tokens_per_s": args.batch * decode_steps / max(seconds - prefill_s, 1e-9)}


def time_decode_steps(cfg, params, args, indices: tuple[int, ...]) -> list[float]:
  """Median seconds of one decode step writing slot i of a cache_len-slot cache, per i.

  The positions are timed interleaved, so a change in machine load hits all of them alike.
  """
  step = jax.jit(functools.partial(decode_step, model_config=cfg), donate_argnums=1,
                 compiler_options=decode_compiler_options())  # as the samplers compile it
  tokens = jnp.ones((args.batch,), jnp.int32)
  caches = []
  for i in indices:
    cache = init_cache(cfg, args.batch, args.cache_len)
    cache["segment"] = cache["segment"].at[:, :i].set(1)  # a filled prefix of i slots
    caches.append(cache)
  times = [[] for _ in indices]
  for r in range(args.repeats + 3):  # the first 3 rounds warm up
    for j, i in enumerate(indices):
      # The donated cache comes back with its index advanced; reset it to i every time.
      cache = dict(caches[j], index=jnp.asarray(i, jnp.int32))
      start = time.perf_counter()
      logits, caches[j] = step(params, cache, tokens, jnp.full((args.batch,), i, jnp.int32))
      jax.block_until_ready(logits)
      if r >= 3:
        times[j].append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def shape_config(args, **overrides):
  """A size preset (vocab from --vocab) or a pretrained model's shape (its own vocab)."""
  return common.shape_config(args.size, args.vocab, **overrides)


def bench_dtype(args, dtype: str, layers: str = "unrolled") -> dict:
  cfg = shape_config(args, dtype=dtype, scan_layers=layers == "scanned")
  params = init_params(cfg)
  out = {"dtype": dtype, "layers": layers, **time_generate(cfg, params, args)}
  lo, hi = (int(p) for p in args.positions.split(","))
  step_lo, step_hi = time_decode_steps(cfg, params, args, (lo, hi))
  out.update({f"step_ms_at_{lo}": 1e3 * step_lo, f"step_ms_at_{hi}": 1e3 * step_hi,
              "step_ratio": step_hi / step_lo,
              "step_tokens_per_s": args.batch / step_lo})
  return out


def compare_with_transformers(args, layers: str) -> dict:
  """Ours against `transformers.generate`, float32, same weights, shapes and sampling."""
  import tempfile
  import torch
  import transformers
  from rlhf_jax.export import hf_export
  torch.set_num_threads(os.cpu_count() or 1)
  cfg = shape_config(args, dtype="float32", scan_layers=layers == "scanned")
  params = init_params(cfg)
  hf_dir = hf_export.export_pretrained(
      params["params"], shape_config(args, dtype="float32"), tempfile.mkdtemp())
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  prompt = np.random.RandomState(0).randint(1, cfg.vocab_size, (args.batch, args.prompt_len))
  ours = make_generate_fn(cfg, args.new_tokens, (), 0, SamplingParams(temperature=1.0))
  tokens = jnp.asarray(prompt, jnp.int32)
  mask = jnp.ones_like(tokens)
  ptoks = torch.tensor(prompt, dtype=torch.long)

  def run_ours():
    out = ours(params, tokens, mask, jax.random.key(1))
    jax.block_until_ready(out)
    return int(out["tokens"].shape[1])

  def run_theirs():
    with torch.inference_mode():
      out = model.generate(ptoks, attention_mask=torch.ones_like(ptoks), do_sample=True,
                           temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    return int(out.shape[1]) - args.prompt_len

  first = {"ours": common.timed(run_ours), "transformers": common.timed(run_theirs)}
  times = {"ours": [], "transformers": []}
  for _ in range(args.peer_rounds):
    for side, fn in (("ours", run_ours), ("transformers", run_theirs)):
      times[side].append(common.timed(fn))
  lengths = {"ours": run_ours(), "transformers": run_theirs()}
  if set(lengths.values()) != {args.new_tokens}:
    raise RuntimeError(f"the sides generated {lengths} tokens per row, not {args.new_tokens}")
  med = {side: statistics.median(t) for side, t in times.items()}
  return {"layers": layers, "dtype": "float32", "seconds": med, "all_seconds": times,
          "first_call_s": first,
          "tokens_per_s": {side: args.batch * args.new_tokens / s for side, s in med.items()},
          "speedup_vs_transformers": med["transformers"] / med["ours"],
          "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                       "torch_threads": torch.get_num_threads()}}


def main():
  args = parse_args()
  dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
  cfg = shape_config(args)
  layouts = [x.strip() for x in args.layers.split(",") if x.strip()]
  if not layouts or set(layouts) - {"unrolled", "scanned"}:
    raise SystemExit(f"--layers {args.layers!r}: give unrolled, scanned or both")
  load_before = os.getloadavg()[0]
  results = {
      "benchmark": "generate", "size": args.size, "vocab": cfg.vocab_size, "batch": args.batch,
      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
      "cache_len": args.cache_len, "params": cfg.param_count(),
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "results": [bench_dtype(args, d, layers) for d in dtypes for layers in layouts],
  }
  if args.peer:
    results["peer"] = [compare_with_transformers(args, layers) for layers in layouts]
    common.write_json(results, args.json_out)
  results["machine"] = {**common.machine_info(), "jax": jax.__version__,
                        "loadavg_1m_before_after": [load_before, os.getloadavg()[0]]}
  common.emit(results, args.json_out)
  lo, hi = args.positions.split(",")
  print(f"\n{args.size} (vocab {cfg.vocab_size}), batch {args.batch}, "
        f"prompt {args.prompt_len} + {args.new_tokens} new tokens; step cache {args.cache_len}\n")
  print(common.markdown_table(
      ["dtype", "layers", "generate tok/s", "decode tok/s", f"step ms @{lo}", f"step ms @{hi}",
       f"ratio @{hi}/@{lo}"],
      [[r["dtype"], r["layers"], f"{r['tokens_per_s']:,.0f}", f"{r['decode_tokens_per_s']:,.0f}",
        f"{r[f'step_ms_at_{lo}']:.2f}", f"{r[f'step_ms_at_{hi}']:.2f}",
        f"{r['step_ratio']:.2f}"] for r in results["results"]]))
  if args.peer:
    print()
    print(common.markdown_table(
        ["layers", "ours s", "transformers s", "ours tok/s", "transformers tok/s",
         "transformers / ours"],
        [[r["layers"], f"{r['seconds']['ours']:.2f}", f"{r['seconds']['transformers']:.2f}",
          f"{r['tokens_per_s']['ours']:,.0f}", f"{r['tokens_per_s']['transformers']:,.0f}",
          f"{r['speedup_vs_transformers']:.2f}x"] for r in results["peer"]]))


if __name__ == "__main__":
  main()
