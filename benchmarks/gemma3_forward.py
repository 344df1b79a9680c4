"""Gemma 3 270M on the CPU: forward and greedy-generation tokens/s, ours (JAX) against
transformers (torch), float32 and bfloat16, in one run.

Both sides hold the same weights: the `gemma3_270m` GGUF (Q4_K_M) imported and dequantised
here, exported as a Gemma3ForCausalLM directory (rlhf_jax.export.hf_export) and loaded by
`transformers`. Forward: logits of every position of one random [batch, seq_len] batch.
Generation: `new_tokens` greedy tokens after a random [batch, prompt_len] prompt, no stop ids
(our jitted KV-cache sampler; `model.generate` with its cache). bfloat16: ours computes in
bfloat16 from float32 params (the trainers' mixed precision); transformers holds bf16 weights.
Each measurement: one warm-up call (ours: the compile, reported apart), then `--repeats` timed
calls, median. The machine may be shared: the load average before and after is recorded.

  .venv/bin/python benchmarks/gemma3_forward.py [--batch 2] [--seq_len 128] [--new_tokens 32]

Prints one JSON object, then a Markdown table. Timings are never asserted.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from hf_forward import jax_forward  # noqa: E402
from rlhf_jax.export import hf_export  # noqa: E402
from rlhf_jax.infer.sampling import SamplingParams, make_generate_fn  # noqa: E402
from rlhf_jax.models import hf_import, pretrained  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq_len", type=int, default=128, help="forward length")
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--repeats", type=int, default=1, help="timed calls after the warm-up")
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


def measure(fn, repeats: int) -> tuple[float, float]:
  """(warm-up seconds, median of `repeats` timed seconds)."""
  first = common.timed(fn)
  return first, statistics.median(common.timed(fn) for _ in range(repeats))


def ours(model_config, params, dtype, tokens, prompt, new_tokens):
  """(forward callable, generation callable) of our model in `dtype`."""
  cfg = dataclasses.replace(model_config, dtype=dtype)
  forward = jax_forward(model_config, params, dtype)
  generate = make_generate_fn(cfg, new_tokens, (), 0, SamplingParams(greedy=True))
  toks, ptoks = jnp.asarray(tokens), jnp.asarray(prompt)
  mask = jnp.ones_like(ptoks)
  return (lambda: forward(params, toks).block_until_ready(),
          lambda: jax.block_until_ready(generate({"params": params}, ptoks, mask,
                                                 jax.random.key(0))["tokens"]))


def theirs(model, torch, tokens, prompt, new_tokens):
  toks, ptoks = torch.tensor(tokens, dtype=torch.long), torch.tensor(prompt, dtype=torch.long)

  def forward():
    with torch.inference_mode():
      model(toks).logits.float()

  def generate():
    with torch.inference_mode():
      model.generate(ptoks, attention_mask=torch.ones_like(ptoks), max_new_tokens=new_tokens,
                     min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                     pad_token_id=0)
  return forward, generate


def run_all(args, model_config, params, hf_dir, torch, transformers) -> list[dict]:
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, model_config.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
  prompt = rng.randint(0, model_config.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  rows = []
  for dtype in args.dtypes.split(","):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, dtype)).eval()
    sides = {"ours": ours(model_config, params, dtype, tokens, prompt, args.new_tokens),
             "transformers": theirs(model, torch, tokens, prompt, args.new_tokens)}
    for side, (forward, generate) in sides.items():
      for what, fn, n in (("forward", forward, args.batch * args.seq_len),
                          ("generation", generate, args.batch * args.new_tokens)):
        warm, s = measure(fn, args.repeats)
        rows.append(dict(framework=side, dtype=dtype, what=what, seconds=s, tokens=n,
                         tokens_per_s=n / s, first_call_s=warm))
    del model
  return rows


def main(argv=None):
  args = parse_args(argv)
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count() or 1)
  load_before = os.getloadavg()
  model_config, params = hf_import.load_pretrained(pretrained.gemma3_270m_path())
  hf_dir = hf_export.export_pretrained(params, model_config, tempfile.mkdtemp())
  rows = run_all(args, model_config, params, hf_dir, torch, transformers)
  result = dict(
      benchmark="gemma3_forward", model="Gemma 3 270M base (GGUF Q4_K_M, dequantised float32)",
      batch=args.batch, seq_len=args.seq_len, prompt_len=args.prompt_len,
      new_tokens=args.new_tokens, repeats=args.repeats, rows=rows,
      versions=dict(jax=jax.__version__, torch=torch.__version__,
                    transformers=transformers.__version__),
      machine={**common.machine_info(), "loadavg_before": load_before,
               "loadavg_after": os.getloadavg()},
      when=datetime.datetime.now().isoformat(timespec="seconds"))
  common.emit(result, args.json_out)
  print()
  print(common.markdown_table(
      ["what", "dtype", "framework", "tokens", "seconds", "tokens/s", "first call (s)"],
      [[r["what"], r["dtype"], r["framework"], r["tokens"], f"{r['seconds']:.3f}",
        f"{r['tokens_per_s']:,.1f}", f"{r['first_call_s']:.1f}"]
       for r in sorted(rows, key=lambda r: (r["what"], r["dtype"]))]))


if __name__ == "__main__":
  main()
