"""Input pipeline throughput: tokens per second delivered tokenized, packed and batched.

    python benchmarks/input_pipeline.py [--data_dir=DIR] [--batch_size=16] [--seq_len=128]

For rlhf_text (pretraining) and rlhf_dialogues (SFT), with a byte-level tokenize_fn and, when
rlhf_jax/text/tokenizer.py is present, a sentencepiece tokenizer trained here on the text train
split. Reports real (non-pad) tokens/s, loss tokens/s, batches/s and packing density, measured
after one warm-up batch (which opens the files). Prints one JSON line, then a Markdown table.
Timings are never asserted: a shared machine makes them noisy, so the load average is printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import common  # noqa: E402
from rlhf_jax.data import builders, pipeline  # noqa: E402


def spm_tokenize_fns(data_dir: str, vocab_size: int, workdir: str):
  """(text_fn, chat_fn, seconds to train) for the project's tokenizer, or None without it."""
  try:
    from rlhf_jax.text import tokenizer as tokenizer_lib
  except ImportError:
    return None
  import tensorflow_datasets as tfds
  source = tfds.data_source("rlhf_text", data_dir=data_dir, split="train")
  texts = [pipeline.decode_record(r)["text"] for r in source.__getitems__(range(len(source)))]
  start = time.perf_counter()
  path = tokenizer_lib.train_tokenizer(texts, os.path.join(workdir, "spm"), vocab_size)
  train_s = time.perf_counter() - start
  tok = tokenizer_lib.Tokenizer.load(path)

  def text_fn(record):
    ids = np.asarray([tok.bos_id, *tok.encode(record["text"]), tok.eos_id], np.int32)
    return ids, np.ones_like(ids)

  def chat_fn(record):
    return tok.render_chat(record["messages"])

  return text_fn, chat_fn, train_s


def measure(name: str, tokenize_fn, args, pack: bool) -> dict:
  it = pipeline.make_lm_iterator(name, "train", data_dir=args.data_dir,
                                 batch_size=args.batch_size, seq_len=args.seq_len,
                                 tokenize_fn=tokenize_fn, seed=0, pack=pack,
                                 read_threads=args.read_threads)
  next(it)  # warm-up: opens the array_record files, starts the read-ahead threads
  before = it.stats
  start = time.perf_counter()
  for _ in range(args.batches):
    next(it)
  seconds = time.perf_counter() - start
  after = it.stats
  tokens = after["tokens"] - before["tokens"]
  positions = args.batches * args.batch_size * args.seq_len
  return {
      "tokens_per_s": round(tokens / seconds),
      "loss_tokens_per_s": round((after["loss_tokens"] - before["loss_tokens"]) / seconds),
      "batches_per_s": round(args.batches / seconds, 1),
      "density": round(tokens / positions, 3),
      "examples_per_batch": round((after["examples"] - before["examples"]) / args.batches, 1),
      "truncated": after["truncated"] - before["truncated"],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--read_threads", type=int, default=2)
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--no_spm", action="store_true", help="byte tokenizer only")
  parser.add_argument("--json_out", default="", help="also write the JSON object to this path")
  args = parser.parse_args()
  args.data_dir = builders.resolve_data_dir(args.data_dir)
  builders.prepare(["rlhf_text", "rlhf_dialogues"], data_dir=args.data_dir)

  tokenizers = {"bytes": (pipeline.byte_tokenize_fn, pipeline.byte_tokenize_fn)}
  results = {"batch_size": args.batch_size, "seq_len": args.seq_len, "batches": args.batches,
             "read_threads": args.read_threads, "load_average": os.getloadavg()[0],
             "cpus": os.cpu_count(), "runs": []}
  with tempfile.TemporaryDirectory() as workdir:
    spm = None if args.no_spm else spm_tokenize_fns(args.data_dir, args.vocab_size, workdir)
    if spm:
      tokenizers["sentencepiece"] = spm[:2]
      results["spm_train_s"] = round(spm[2], 1)
    for tok_name, (text_fn, chat_fn) in tokenizers.items():
      for name, fn in (("rlhf_text", text_fn), ("rlhf_dialogues", chat_fn)):
        for pack in (True, False):
          row = {"dataset": name, "tokenizer": tok_name, "pack": pack}
          row.update(measure(name, fn, args, pack))
          results["runs"].append(row)

  cols = ("dataset", "tokenizer", "pack", "tokens_per_s", "loss_tokens_per_s", "batches_per_s",
          "density", "examples_per_batch", "truncated")
  results["machine"] = {**common.machine_info(), "loadavg_1m_after": os.getloadavg()[0]}
  common.emit(results, args.json_out)
  print(f"\ninput pipeline, batch {args.batch_size} x {args.seq_len}, {args.batches} batches, "
        f"load average {results['load_average']:.1f} on {results['cpus']} cpus\n")
  print(common.markdown_table(list(cols), [[row[c] for c in cols] for row in results["runs"]]))


if __name__ == "__main__":
  main()
