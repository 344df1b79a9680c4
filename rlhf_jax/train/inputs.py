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
# Re-exported: callers read inputs.tokenize_fn_for and inputs.fit_conversation.
from rlhf_jax.data.examples import fit_conversation, tokenize_fn_for  # noqa: F401

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
