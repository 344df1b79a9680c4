"""Where a trainer's tokenizer and batches come from, chosen by `config.tokenizer` / `config.data`.

`data.name == "synthetic"` gives a learnable synthetic token stream (tests, benchmarks);
any other name is a TFDS dataset read through the grain pipeline of `rlhf_jax.data`.
"""
from __future__ import annotations

import logging
import os

import jax
from jax.experimental import multihost_utils

from rlhf_jax.core import run_folder
from rlhf_jax.data.synthetic import SyntheticLMIterator
from rlhf_jax.data import sources
from rlhf_jax.text import tokenizer as tok_lib
from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
from rlhf_jax.data import builders, pipeline

log = logging.getLogger(__name__)


def tokenizer_path(config, workdir: str) -> str:
  return config.tokenizer.path or run_folder.tokenizer_file(workdir)


def tokenizer_corpus():
  """Every bundled text in both languages: dialogues, news and reviews (rlhf_text's records)."""
  for record in sources.text_records():
    yield record["text"]


def load_tokenizer(config, workdir: str):
  """(tokenizer, vocab size). Without `tokenizer.path` one is trained into the workdir once."""
  if config.data.name == "synthetic":
    return None, config.model.vocab_size
  if config.tokenizer.path and not config.tokenizer.path.endswith(".model"):
    # An imported model's own tokenizer: an HF directory, a .gguf file or a preset name.
    tokenizer = load_any_tokenizer(config.tokenizer.path, config.model.vocab_size)
    return tokenizer, tokenizer.vocab_size
  path = tokenizer_path(config, workdir)
  if not config.tokenizer.path and not os.path.exists(path):
    if jax.process_index() == 0:
      log.info("training a %d-piece tokenizer into %s", config.tokenizer.vocab_size, path)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tok_lib.train_tokenizer(tokenizer_corpus(), path[:-len(".model")],
                              config.tokenizer.vocab_size,
                              character_coverage=config.tokenizer.character_coverage)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("tokenizer trained")
  tokenizer = tok_lib.Tokenizer.load(path)
  return tokenizer, tokenizer.vocab_size


def fit_conversation(tokenizer, messages, max_len: int):
  """The longest run of whole turns, ending on an assistant turn, that renders in `max_len`.

  Long chats are cut at a turn boundary rather than mid-answer, so SFT trains on complete
  exchanges; a conversation whose first exchange alone is too long is returned whole (the
  pipeline then truncates it, and counts it).
  """
  ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  best = None
  for end in ends:  # grow whole exchanges until the next one no longer fits
    ids, mask = tokenizer.render_chat(messages[:end + 1])
    if len(ids) > max_len:
      break
    best = (ids, mask)
  return best if best is not None else tokenizer.render_chat(messages)


def tokenize_fn_for(tokenizer, max_len: int | None = None, text_field: str = "text"):
  """record -> (ids, loss_mask): chats through the chat template, plain text trained on fully.

  Any TFDS dataset works: records with `messages` are chats, otherwise `text_field` is read.
  """
  import numpy as np

  def tokenize(record):
    if "messages" in record:
      if max_len:
        return fit_conversation(tokenizer, record["messages"], max_len)
      return tokenizer.render_chat(record["messages"])
    if text_field not in record:
      raise KeyError(f"record {record.get('id', '')!r} has fields {sorted(record)}: expected "
                     f"'messages' (a chat) or {text_field!r} (text); set data.text_field")
    text = record[text_field]
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    ids = np.asarray([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id], np.int32)
    return ids, np.ones_like(ids)

  return tokenize


def make_lm_inputs(config, tokenizer, process_index: int, process_count: int):
  """An iterator of this process's share of each global batch, with get_state / set_state."""
  data = config.data
  if data.name == "synthetic":
    return SyntheticLMIterator(data.batch_size, data.seq_len, config.model.vocab_size,
                               seed=config.seed, process_index=process_index,
                               process_count=process_count)
  data_dir = builders.resolve_data_dir(data.data_dir or None)
  if data.name in builders.BUNDLED_DATASETS and process_count > 1:
    # One process prepares a bundled dataset that is missing; the others wait for it.
    if process_index == 0:
      builders.prepare([data.name], data_dir=data_dir)
    multihost_utils.sync_global_devices(f"prepared {data.name}")
  # Chats are cut at turn boundaries to fit a row (an example of seq_len tokens fills one).
  return pipeline.make_lm_iterator(
      data.name, data.split, data_dir=data_dir, batch_size=data.batch_size,
      seq_len=data.seq_len,
      tokenize_fn=tokenize_fn_for(tokenizer, data.seq_len, data.get("text_field", "text")),
      seed=config.seed,
      process_index=process_index, process_count=process_count, pack=data.pack,
      lang_repeat=pipeline.parse_lang_repeat(data.get("lang_repeat", "")))
