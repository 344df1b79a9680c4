"""Prompts for PPO: rendered with the chat template, balanced by language, left-padded.

Every batch has a fixed shape [B, max_prompt_len], so the rollout compiles once. With
`langs=("en", "zh")` each batch is half English, half Chinese whatever the corpus' mix (the
bundled prompts are 4/5 Chinese), so both languages improve side by side and the metrics of
one language are not noise from a handful of episodes.

A prompt whose rendering is longer than `max_prompt_len` is skipped and counted, never cut:
cutting would keep the start of a question and drop the end the answer should follow.

The stream is resumable: its state is, per language, the epoch and the offset into that
epoch's permutation (a function of seed, epoch and language), so a run restarted from a
checkpoint sees exactly the prompts it would have seen.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from rlhf_jax.infer.answers import pad_left
from rlhf_jax.data import labelers
from rlhf_jax.data.pipeline import decode_record

log = logging.getLogger(__name__)

LANG_CHOICES = {"en": ("en",), "zh": ("zh",), "both": ("en", "zh")}


def parse_langs(lang: str) -> tuple[str, ...]:
  if lang not in LANG_CHOICES:
    raise ValueError(f"data.lang must be one of {sorted(LANG_CHOICES)}, got {lang!r}")
  return LANG_CHOICES[lang]


def render(tokenizer, prompt: str) -> np.ndarray:
  """ids [L] of a one-turn chat ending with the assistant header."""
  return tokenizer.render_prompt([{"role": "user", "content": prompt}])


def read_records(source) -> list[dict[str, Any]]:
  """Every record of a TFDS data source, decoded (prompt datasets are small)."""
  return [decode_record(r) for r in source.__getitems__(list(range(len(source))))]


def records_by_lang(records, langs) -> dict[str, list[dict]]:
  out = {lang: [r for r in records if r.get("lang") == lang] for lang in langs}
  for lang, rows in out.items():
    if not rows:
      raise ValueError(f"no prompts in language {lang!r} (languages present: "
                       f"{sorted({r.get('lang') for r in records})})")
  return out


class PromptStream:
  """An endless iterator of this process's prompt batches: dicts of
    tokens [b, P] int32, mask [b, P] int32, lang [b] (str), prompt [b] (str)
  with b = batch_size / process_count split evenly over the languages.
  """

  def __init__(self, records: Sequence[dict], tokenizer, *, langs: Sequence[str],
               batch_size: int, max_prompt_len: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    for lang in langs:
      labelers._check_lang(lang)
    local = batch_size // process_count
    if batch_size % process_count or local % len(langs):
      raise ValueError(f"data.batch_size={batch_size} must split evenly over {process_count} "
                       f"processes and the languages {tuple(langs)}")
    self.langs = tuple(langs)
    self.per_lang = local // len(langs)
    self.tokenizer = tokenizer
    self.max_prompt_len = max_prompt_len
    self.seed = seed
    by_lang = records_by_lang(records, self.langs)
    self.records = {lang: rows[process_index::process_count] for lang, rows in by_lang.items()}
    self.epoch = {lang: 0 for lang in self.langs}
    self.offset = {lang: 0 for lang in self.langs}
    self.skipped = 0
    self._cached: tuple[Any, Any] = (None, None)

  def _order(self, lang: str) -> np.ndarray:
    key = (lang, self.epoch[lang])
    if self._cached[0] != key:
      rng = np.random.default_rng([self.seed, self.epoch[lang], self.langs.index(lang)])
      self._cached = (key, rng.permutation(len(self.records[lang])))
    return self._cached[1]

  def _next_of(self, lang: str) -> tuple[np.ndarray, str]:
    order = self._order(lang)
    for _ in range(2 * len(order) + 1):
      if self.offset[lang] >= len(order):
        self.epoch[lang] += 1
        self.offset[lang] = 0
        order = self._order(lang)
      record = self.records[lang][order[self.offset[lang]]]
      self.offset[lang] += 1
      ids = render(self.tokenizer, record["prompt"])
      if len(ids) <= self.max_prompt_len:
        return ids, record["prompt"]
      self.skipped += 1
      if self.skipped == 1:
        log.warning("a %s prompt of %d tokens is longer than data.max_prompt_len=%d: skipped "
                    "(counted in rollout/skipped_prompts)", lang, len(ids), self.max_prompt_len)
    raise ValueError(f"no {lang} prompt fits in data.max_prompt_len={self.max_prompt_len}")

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    rows, langs, texts = [], [], []
    for lang in self.langs:
      for _ in range(self.per_lang):
        ids, text = self._next_of(lang)
        rows.append(ids)
        langs.append(lang)
        texts.append(text)
    tokens, mask = pad_left(rows, self.max_prompt_len, self.tokenizer.pad_id)
    return {"tokens": tokens, "mask": mask, "lang": langs, "prompt": texts}

  def get_state(self) -> dict[str, Any]:
    return {"epoch": dict(self.epoch), "offset": dict(self.offset), "skipped": self.skipped}

  def set_state(self, state: dict[str, Any]) -> None:
    self.epoch = {lang: int(state["epoch"][lang]) for lang in self.langs}
    self.offset = {lang: int(state["offset"][lang]) for lang in self.langs}
    self.skipped = int(state.get("skipped", 0))


def eval_prompts(records: Sequence[dict], tokenizer, lang: str, n: int,
                 max_prompt_len: int) -> list[str]:
  """The first n prompts of a language (in the split's order) that fit: a fixed held-out set."""
  out = []
  for record in records_by_lang(records, (lang,))[lang]:
    if len(render(tokenizer, record["prompt"])) <= max_prompt_len:
      out.append(record["prompt"])
      if len(out) == n:
        break
  return out
