"""Data card: what is in every prepared dataset, per split and language.

    python -m rlhf_jax.data.card [--data_dir=DIR] [--tokenizer=spm.model] [--prepare] [--json]

For each `<dataset>/<config>` found in data_dir and each split: the record count, the count
per language and per source, and length statistics of the record's text (all its text fields
joined: a dialogue's turns, a comparison's prompt and answers) in sentencepiece tokens when a
tokenizer model is given, else in characters -- so the two languages can be compared before
anything is trained on them. `--prepare` first prepares the bundled datasets.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import builders, pipeline

READ_CHUNK = 1024
PERCENTILES = (50, 90, 99)


def record_text(record: dict[str, Any]) -> str:
  """Every piece of text a record carries, joined by newlines (ids and tags left out)."""
  parts = []
  for key, value in record.items():
    if key in ("id", "lang", "source"):
      continue
    if isinstance(value, str):
      parts.append(value)
    elif isinstance(value, list):
      for item in value:
        if isinstance(item, str):
          parts.append(item)
        elif isinstance(item, dict) and "content" in item:
          parts.append(item["content"])
  return "\n".join(parts)


def find_datasets(data_dir: str) -> list[tuple[str, str]]:
  """(tfds name 'dataset/config:version', prepared directory) for each prepared dataset."""
  found = []
  for name in builders.BUILDERS:
    root = os.path.join(data_dir, name)
    if not os.path.isdir(root):
      continue
    for config in sorted(os.listdir(root)):
      config_dir = os.path.join(root, config)
      if config.startswith(".") or not os.path.isdir(config_dir):
        continue
      for version in sorted(os.listdir(config_dir)):
        path = os.path.join(config_dir, version)
        if os.path.exists(os.path.join(path, "dataset_info.json")):
          found.append((f"{name}/{config}:{version}", path))
  return found


def read_split(builder: tfds.core.DatasetBuilder, split: str) -> list[dict[str, Any]]:
  source = builder.as_data_source(split=split)
  records = []
  for start in range(0, len(source), READ_CHUNK):
    keys = list(range(start, min(start + READ_CHUNK, len(source))))
    records.extend(pipeline.decode_record(r) for r in source.__getitems__(keys))
  return records


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
  if not len(lengths):
    return {}
  values = np.asarray(lengths)
  stats = {"total": int(values.sum()), "mean": round(float(values.mean()), 1),
           "min": int(values.min())}
  stats.update({f"p{p}": int(np.percentile(values, p)) for p in PERCENTILES})
  stats["max"] = int(values.max())
  return stats


def split_card(records: list[dict[str, Any]], measure: Callable[[list[str]], list[int]]
               ) -> dict[str, Any]:
  """Counts and length stats for one split, overall and per language."""
  lengths = measure([record_text(r) for r in records])
  by_lang: dict[str, list[int]] = collections.defaultdict(list)
  for record, n in zip(records, lengths):
    by_lang[record.get("lang", "?")].append(n)
  return {
      "count": len(records),
      "sources": dict(sorted(collections.Counter(r.get("source", "") for r in records).items())),
      "length": length_stats(lengths),
      "langs": {lang: {"count": len(ns), "length": length_stats(ns)}
                for lang, ns in sorted(by_lang.items())},
  }


def make_measure(tokenizer: str | None) -> tuple[str, Callable[[list[str]], list[int]]]:
  """(unit, texts -> lengths): tokens of a tokenizer (a sentencepiece .model, a Hugging Face
  directory, a .gguf file or a preset such as gemma3_270m), else characters."""
  if not tokenizer:
    return "chars", lambda texts: [len(t) for t in texts]
  from rlhf_jax.text.hf_tokenizer import load_any_tokenizer  # Only needed with --tokenizer.
  processor = load_any_tokenizer(tokenizer)
  return "tokens", lambda texts: [len(processor.encode(t)) for t in texts]


def dataset_card(data_dir: str, tokenizer: str | None = None,
                 only: Sequence[str] = ()) -> dict[str, Any]:
  """{'unit': ..., 'datasets': {name: {'metadata': ..., 'splits': {split: split_card}}}}, of
  every prepared dataset, or of those whose name starts with one of `only`."""
  unit, measure = make_measure(tokenizer)
  card: dict[str, Any] = {"data_dir": data_dir, "unit": unit, "datasets": {}}
  found = find_datasets(data_dir)
  chosen = [(name, path) for name, path in found
            if not only or any(name.startswith(prefix) for prefix in only)]
  if only and not chosen:
    raise SystemExit(f"--only={','.join(only)}: no prepared dataset starts with that in "
                     f"{data_dir} (there: {', '.join(name for name, _ in found) or 'none'})")
  for name, path in chosen:
    builder = tfds.builder_from_directory(path)
    splits = {split: split_card(read_split(builder, split), measure)
              for split in builder.info.splits}
    metadata = dict(builder.info.metadata or {})
    card["datasets"][name] = {"splits": splits, "metadata": metadata}
  return card


def sft_mix(data_dir: str, tokenizer: str, seq_len: int, lang_repeat: str = "",
            name: str = "rlhf_dialogues", split: str = "train") -> dict[str, dict[str, int]]:
  """What one epoch of SFT trains on, per language: {lang: {records, tokens, trained, share}}.

  Unlike the card's lengths (a record's raw text), this renders each dialogue with the
  tokenizer's chat template and cuts it to `seq_len` at a turn boundary as SFT does
  (train/inputs.py), counts the answer tokens the loss reads (`trained`), and repeats each
  language as `data.lang_repeat` does. `share`: the language's percent of `tokens`."""
  from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
  from rlhf_jax.data.examples import tokenize_fn_for
  tokenize = tokenize_fn_for(load_any_tokenizer(tokenizer), seq_len)
  repeat = pipeline.parse_lang_repeat(lang_repeat)
  builder = builders.open_builder(name, data_dir)
  mix: dict[str, dict[str, int]] = collections.defaultdict(
      lambda: {"records": 0, "tokens": 0, "trained": 0})
  for record in read_split(builder, split):
    ids, mask = tokenize(record)
    lang = record.get("lang", "?")
    times = repeat.get(lang, 1)
    mix[lang]["records"] += times
    mix[lang]["tokens"] += times * min(len(ids), seq_len)
    mix[lang]["trained"] += times * int(np.asarray(mask)[:seq_len].sum())
  total = sum(m["tokens"] for m in mix.values()) or 1
  for m in mix.values():
    m["share"] = round(100.0 * m["tokens"] / total, 1)
  return dict(sorted(mix.items()))


def _length_cells(stats: dict[str, float]) -> str:
  if not stats:
    return ""
  return " ".join(f"{stats[k]:>7}" for k in ("mean", "p50", "p90", "p99", "max", "total"))


def format_card(card: dict[str, Any]) -> str:
  """A plain-text table: one line per dataset, split and language."""
  header = (f"{'dataset':<32} {'split':<10} {'lang':<5} {'count':>7}   "
            f"{'length in ' + card['unit'] + ':':<18}"
            + " ".join(f"{k:>7}" for k in ("mean", "p50", "p90", "p99", "max", "total")))
  lines = [f"data card of {card['data_dir']}", header, "-" * len(header)]
  if not card["datasets"]:
    lines.append("(no prepared datasets)")
  for name, dataset in card["datasets"].items():
    for split, info in dataset["splits"].items():
      lines.append(f"{name:<32} {split:<10} {'all':<5} {info['count']:>7}   {'':<18}"
                   + _length_cells(info["length"]))
      for lang, sub in info["langs"].items():
        lines.append(f"{'':<32} {'':<10} {lang:<5} {sub['count']:>7}   {'':<18}"
                     + _length_cells(sub["length"]))
      sources = ", ".join(f"{s or '-'} {n}" for s, n in info["sources"].items())
      lines.append(f"{'':<32} {'':<10} sources: {sources}")
    dropped = dataset["metadata"].get("source_stats")
    if dropped:
      lines.append(f"{'':<32} source notes: "
                   + ", ".join(f"{k} {v}" for k, v in dropped.items()))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Print the data card of a TFDS data_dir.")
  parser.add_argument("--data_dir", default=None,
                      help=f"default: {builders.DEFAULT_DATA_DIR}")
  parser.add_argument("--tokenizer", default=None,
                      help="sentencepiece .model, HF directory, .gguf or preset (gemma3_270m)")
  parser.add_argument("--prepare", action="store_true",
                      help="prepare the bundled datasets first")
  parser.add_argument("--only", default="",
                      help="comma-separated dataset name prefixes (rlhf_dialogues,rlhf_prompts)")
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  parser.add_argument("--sft_seq_len", type=int, default=0,
                      help="with --tokenizer: also the SFT mix, dialogues rendered and cut to "
                           "this many tokens, per language")
  parser.add_argument("--lang_repeat", default="", help="the SFT mix's data.lang_repeat (zh:16)")
  args = parser.parse_args(argv)
  data_dir = builders.resolve_data_dir(args.data_dir)
  if args.prepare:
    builders.prepare(data_dir=data_dir)
  if args.sft_seq_len:
    if not args.tokenizer:
      raise SystemExit("--sft_seq_len needs --tokenizer (the chat template renders the mix)")
    mix = sft_mix(data_dir, args.tokenizer, args.sft_seq_len, args.lang_repeat)
    print(f"SFT mix of rlhf_dialogues[train], one epoch, seq_len={args.sft_seq_len}, "
          f"lang_repeat={args.lang_repeat!r}:")
    for lang, m in mix.items():
      print(f"  {lang:<4} records {m['records']:>7,}  tokens {m['tokens']:>9,} "
            f"({m['share']:>5}%)  trained (answers) {m['trained']:>9,}")
  card = dataset_card(data_dir, args.tokenizer,
                      [prefix for prefix in args.only.split(",") if prefix])
  print(json.dumps(card, ensure_ascii=False, indent=1) if args.json else format_card(card))


if __name__ == "__main__":
  main()
