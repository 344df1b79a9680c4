"""Greedy answers of the two real models on hand, through their own tokenizers: Gemma 3 270M
(base, multilingual) and SmolLM2-135M-Instruct (English), to English and Chinese prompts, as
plain-text continuations and as chats in each model's template.

  python experiments/model_families/greedy_answers.py [--new_tokens 40] [--json_out F]

Both come from GGUF files (`pretrained.resolve`): weights dequantised to float32, tokenizer and
chat template read by rlhf_jax.text.hf_tokenizer (Gemma's template from
rlhf_jax.text.chat_template.GEMMA_TEMPLATE, since its GGUF carries none). Continuations start
with BOS (Gemma; SmolLM2 has none) and run our KV-cache sampler, greedy, until a stop id or
`--new_tokens`. This is where the recipe starts: what the untouched models say.
"""
import argparse
import json
import time

import jax
import numpy as np

from rlhf_jax.infer import answers
from rlhf_jax.infer.sampling import SamplingParams, make_generate_fn
from rlhf_jax.models import hf_import, pretrained
from rlhf_jax.text.hf_tokenizer import HFTokenizer

TEXTS = ["The capital of France is Paris. The capital of Germany is",
         "Here is a short poem about the sea:\n",
         "法国的首都是巴黎。中国的首都是",
         "我最喜欢的季节是秋天，因为"]
CHATS = ["What is the capital of Japan?", "Give me one tip for learning a new language.",
         "日本的首都是哪里？", "请用一句话介绍一下你自己。"]


def continuations(cfg, params, tok, texts, new_tokens: int) -> list[str]:
  """Greedy text continuations of `texts` (BOS first where the tokenizer has its own)."""
  has_bos = tok.bos_id != tok.eos_id
  rows = [np.asarray(([tok.bos_id] if has_bos else []) + tok.encode(t), np.int32) for t in texts]
  tokens, mask = answers.left_pad(rows, tok.pad_id)
  fn = make_generate_fn(cfg, new_tokens, (tok.eos_id,), tok.pad_id, SamplingParams(greedy=True))
  out = jax.device_get(fn({"params": params}, tokens, mask, jax.random.key(0)))
  return [tok.decode([int(t) for t, m in zip(row, row_mask) if m and int(t) != tok.eos_id])
          for row, row_mask in zip(out["tokens"], out["mask"])]


def run(name: str, new_tokens: int) -> dict:
  path = pretrained.resolve(name)
  start = time.time()
  cfg, params = hf_import.load_pretrained(path)
  tok = HFTokenizer.load(path, cfg.vocab_size)
  loaded = time.time() - start
  start = time.time()
  text = continuations(cfg, params, tok, TEXTS, new_tokens)
  chat = answers.answer(params, cfg, tok, CHATS, rng=jax.random.key(0),
                        max_new_tokens=new_tokens, greedy=True)
  return dict(model=name, load_s=loaded, generate_s=time.time() - start,
              continuations=dict(zip(TEXTS, text)), chats=dict(zip(CHATS, chat)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--new_tokens", type=int, default=40)
  parser.add_argument("--models", default="gemma3_270m,smollm2_135m")
  parser.add_argument("--json_out", default="")
  args = parser.parse_args()
  results = [run(name, args.new_tokens) for name in args.models.split(",")]
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=2, ensure_ascii=False)
  for r in results:
    print(f"\n## {r['model']} (load {r['load_s']:.0f} s, generation {r['generate_s']:.0f} s)\n")
    print("| kind | prompt | greedy answer |\n|---|---|---|")
    for kind in ("continuations", "chats"):
      for prompt, reply in r[kind].items():
        cell = [json.dumps(x, ensure_ascii=False)[1:-1].replace("|", "\\|")
                for x in (prompt, reply)]
        print(f"| {kind[:-1]} | `{cell[0]}` | `{cell[1]}` |")


if __name__ == "__main__":
  main()
