"""Reward-model batches: K answers per prompt, padded and masked, with their preference mask.

A batch element is one prompt with up to K = data.max_answers answers (fewer are padded and
masked), each rendered as prompt + answer in the chat template and right-padded to seq_len:

  tokens, positions, segment_ids  [B, K, T] int32   one row per answer ("answers" layout)
  valid                           [B, K]    float   1 = a real answer
  prefer                          [B, K, K] float   1 where answer i was preferred to answer j
  margin                          [B, K, K] float   loss.margin times the pair's grade gap
  label, labeled                  [B, K]    float   thumbs (1 like / 0 dislike) for binary data
  lang                            [B]       int32   index in LANGS, -1 for other languages

The "shared_prompt" layout writes each comparison as one row of data.row_len positions: the
tokens its K rendered answers share (the prompt, in the chat template) once, then each answer's
own tokens, which see the shared ones through `prefix_ids` (models/transformer.py's mask) and
not each other. The scores are the answers layout's (the same token rows, the same attention),
from fewer positions: a 48-token prompt with four 24-token answers is 144 positions, not 4 x 72.
Here row_len is the budget, not seq_len: a comparison that does not fit loses its prompt's
oldest tokens after the first, once for all its answers (counted as truncated answers), and
one whose answers alone do not fit is an error naming it.

  tokens, positions, segment_ids, prefix_ids  [B, R] int32   segment 1 the shared tokens,
                                                             2 + i answer i; prefix 1 there
  score_at                                    [B, K] int32   each answer's last slot
  answer_mask                                 [B, R] int32   1 on answer tokens (the chat's
                                                             last loss run, rm_scores.
                                                             encode_scored); tokens all K
                                                             answers start with are shared ones

Where pairs come from: a ranking gives all K(K-1)/2 pairs; grades (0 good, 1 average, 2 poor)
a pair for every two answers of different grade. `unit="pair"` makes every (better, worse)
pair its own element (K = 2), shuffled across the data set: the "independent pairs" ablation.

Bad input is counted, never silent: pairs between identical answers are dropped (a preference
between two copies of one text is noise) and a comparison left with no pair (all tied, or all
identical) is skipped -- both counted in `stats` and logged. More answers than max_answers is
an error naming the record.

Elements are indices into a table ([record, better, worse], -1 = the whole comparison) read
through grain, so the iterator's state is a few integers and a resumed run continues exactly.
Once the data is spent (one epoch by default) the iterator yields empty batches, which the
train step does not apply.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import grain
import numpy as np

from rlhf_jax.core.langs import LANGS
from rlhf_jax.infer.rm_scores import encode_answer, encode_scored
from rlhf_jax.data.builders import comparison_pairs
from rlhf_jax.data.pipeline import decode_record, load_source

log = logging.getLogger(__name__)

UNITS = ("comparison", "pair")
LAYOUTS = ("answers", "shared_prompt")
# What the model reads of a batch, per layout (rm_scores.comparison_scores).
MODEL_KEYS = {"answers": ("tokens", "positions", "segment_ids"),
              "shared_prompt": ("tokens", "positions", "segment_ids", "prefix_ids", "score_at",
                                "answer_mask")}
STAT_KEYS = ("elements", "skipped_no_pairs", "identical_pairs", "truncated_answers")
_WARN_SKIPS = 3  # skipped records named in the log, per process; the rest are only counted
_WHOLE = 1 << 30  # no cut: the shared_prompt layout cuts the shared prompt itself


class TooManyAnswersError(ValueError):
  pass


def preference_of(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(prefer [K, K], gap [K, K]) of a comparison record from its ranking or its grades.

  gap is how many grades apart the two answers are (1 for every ranked pair).
  """
  k = len(record["responses"])
  ranking, grades = list(record.get("ranking") or ()), list(record.get("grades") or ())
  if ranking:
    if sorted(ranking) != list(range(k)):
      raise ValueError(f"comparison {record.get('id')!r}: ranking {ranking} is not a "
                       f"permutation of its {k} answers")
    position = np.empty(k, np.int64)
    position[ranking] = np.arange(k)
    prefer = position[:, None] < position[None, :]
    return prefer.astype(np.float32), prefer.astype(np.float32)
  if len(grades) != k:
    raise ValueError(f"comparison {record.get('id')!r} has {len(grades)} grades for {k} answers")
  g = np.asarray(grades, np.int64)
  prefer = g[:, None] < g[None, :]
  return prefer.astype(np.float32), np.maximum(g[None, :] - g[:, None], 0).astype(np.float32)


class Encoder:
  """Turns records into numpy batch elements (see the module doc); picklable."""

  def __init__(self, tokenizer, *, seq_len: int, max_answers: int, margin: float = 0.0,
               layout: str = "answers", row_len: int = 0):
    if layout not in LAYOUTS:
      raise ValueError(f"unknown data.layout {layout!r}; choose from {list(LAYOUTS)}")
    if layout == "shared_prompt" and row_len < 2:
      raise ValueError(f"data.layout='shared_prompt' needs data.row_len >= 2 (got {row_len})")
    self.tokenizer, self.seq_len, self.max_answers = tokenizer, seq_len, max_answers
    self.margin = float(margin)
    self.layout, self.row_len = layout, row_len
    self._named_skips = 0

  def empty(self, n: int) -> dict[str, np.ndarray]:
    k, t = self.max_answers, self.seq_len
    if self.layout == "shared_prompt":
      r = self.row_len
      rows = {"tokens": np.full((n, r), self.tokenizer.pad_id, np.int32),
              "positions": np.zeros((n, r), np.int32),
              "segment_ids": np.zeros((n, r), np.int32),
              "prefix_ids": np.zeros((n, r), np.int32),
              "score_at": np.zeros((n, k), np.int32),
              "answer_mask": np.zeros((n, r), np.int32)}
    else:
      rows = {"tokens": np.full((n, k, t), self.tokenizer.pad_id, np.int32),
              "positions": np.zeros((n, k, t), np.int32),
              "segment_ids": np.zeros((n, k, t), np.int32)}
    return {**rows,
            "valid": np.zeros((n, k), np.float32),
            "prefer": np.zeros((n, k, k), np.float32),
            "margin": np.zeros((n, k, k), np.float32),
            "label": np.zeros((n, k), np.float32),
            "labeled": np.zeros((n, k), np.float32),
            "lang": np.full((n,), -1, np.int32)}

  def encode_into(self, out: dict[str, np.ndarray], row: int, record: dict[str, Any],
                  pair: tuple[int, int] | None, stats: np.ndarray) -> None:
    """Writes `record` (restricted to answers (better, worse) when `pair`) into row `row`."""
    binary = "responses" not in record
    if binary:  # a thumb on one answer: {prompt, response, label}
      responses = [record["response"]]
      prefer = gap = np.zeros((1, 1), np.float32)
    else:
      responses = list(record["responses"])
      prefer, gap = preference_of(record)
      if pair is not None:
        w, l = pair
        responses = [responses[w], responses[l]]
        prefer = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)
        gap = np.array([[0.0, gap[w, l]], [0.0, 0.0]], np.float32)
    k = len(responses)
    if k > self.max_answers:
      raise TooManyAnswersError(
          f"comparison {record.get('id')!r} has K={k} answers, more than data.max_answers="
          f"{self.max_answers}; raise data.max_answers (batches are [B, max_answers, T])")
    stats[STAT_KEYS.index("elements")] += 1
    if not binary:
      prefer = prefer.copy()
      for i in range(k):
        for j in range(k):
          if i != j and prefer[i, j] and responses[i] == responses[j]:
            prefer[i, j] = 0.0
            stats[STAT_KEYS.index("identical_pairs")] += 1
      if not prefer.any():
        stats[STAT_KEYS.index("skipped_no_pairs")] += 1
        if self._named_skips < _WARN_SKIPS:
          self._named_skips += 1
          log.warning("comparison %r gives no pair (all tied or identical answers): skipped "
                      "and counted in data/skipped_no_pairs", record.get("id"))
        return
    if self.layout == "shared_prompt":  # whole rows; the prompt is cut once, to fit row_len
      encoded = [encode_scored(self.tokenizer, record["prompt"], r, _WHOLE) for r in responses]
      cut = self._write_shared(out, row, [ids for ids, _, _ in encoded], record.get("id"),
                               [m for _, m, _ in encoded])
      stats[STAT_KEYS.index("truncated_answers")] += cut
    else:
      rendered = [encode_answer(self.tokenizer, record["prompt"], r, self.seq_len)
                  for r in responses]
      stats[STAT_KEYS.index("truncated_answers")] += sum(int(cut) for _, cut in rendered)
      for i, (ids, _) in enumerate(rendered):
        out["tokens"][row, i, :len(ids)] = ids
        out["positions"][row, i, :len(ids)] = np.arange(len(ids))
        out["segment_ids"][row, i, :len(ids)] = 1
    out["valid"][row, :k] = 1.0
    out["prefer"][row, :k, :k] = prefer
    out["margin"][row, :k, :k] = self.margin * gap
    if binary:
      out["label"][row, 0] = float(record["label"])
      out["labeled"][row, 0] = 1.0
    lang = record.get("lang", "")
    out["lang"][row] = LANGS.index(lang) if lang in LANGS else -1

  def _write_shared(self, out, row: int, rows: list[np.ndarray], record_id,
                    answer_masks: list[np.ndarray]) -> int:
    """Writes the rendered answers `rows` (their answer tokens marked by `answer_masks`) as one
    shared_prompt row; returns how many answers' prompts lost tokens to fit row_len (the oldest
    after the first, as `encode_answer` cuts)."""
    shared = _common_prefix_len(rows)
    suffixes = [ids[shared:] for ids in rows]
    prefix, prefix_mask = rows[0][:shared], answer_masks[0][:shared]
    over = shared + sum(len(x) for x in suffixes) - self.row_len
    cut = 0
    if over > 0:
      if shared - 1 < over:
        raise ValueError(
            f"comparison {record_id!r}: its {len(rows)} answers alone need "
            f"{sum(len(x) for x in suffixes) + 1} positions with the first prompt token, more "
            f"than data.row_len={self.row_len} of the shared_prompt layout; raise data.row_len")
      prefix = np.concatenate([prefix[:1], prefix[1 + over:]])
      prefix_mask = np.concatenate([prefix_mask[:1], prefix_mask[1 + over:]])
      cut = len(rows)
    n = len(prefix)
    out["answer_mask"][row, :n] = prefix_mask
    out["tokens"][row, :n] = prefix
    out["positions"][row, :n] = np.arange(n)
    out["segment_ids"][row, :n] = 1
    slot = n
    for i, suffix in enumerate(suffixes):
      end = slot + len(suffix)
      out["tokens"][row, slot:end] = suffix
      out["positions"][row, slot:end] = np.arange(n, n + len(suffix))
      out["segment_ids"][row, slot:end] = 2 + i
      out["answer_mask"][row, slot:end] = answer_masks[i][shared:]
      out["prefix_ids"][row, slot:end] = 1
      out["score_at"][row, i] = end - 1
      slot = end
    return cut

  def encode_batch(self, records, pairs, n_rows: int) -> dict[str, np.ndarray]:
    """A batch of n_rows elements (records beyond len(records) are empty), with `stats`."""
    out = self.empty(n_rows)
    stats = np.zeros(len(STAT_KEYS), np.int64)
    for row, (record, pair) in enumerate(zip(records, pairs)):
      self.encode_into(out, row, record, pair, stats)
    out["stats"] = stats
    return out


def encoder_for(data, tokenizer, *, max_answers: int | None = None,
                margin: float = 0.0) -> Encoder:
  """The Encoder of an RM config's `data` section (its layout and row_len where it has them)."""
  return Encoder(tokenizer, seq_len=data.seq_len,
                 max_answers=data.max_answers if max_answers is None else max_answers,
                 margin=margin, layout=data.get("layout", "answers"),
                 row_len=data.get("row_len", 0))


def _common_prefix_len(rows: list[np.ndarray]) -> int:
  """Tokens every row starts with, short of each row's last token (where its score is read)."""
  limit = min(len(ids) for ids in rows) - 1
  n = 0
  while n < limit and all(ids[n] == rows[0][n] for ids in rows):
    n += 1
  return n


def element_table(source, unit: str) -> np.ndarray:
  """int32 [M, 3] of (record, better, worse); better = worse = -1 for a whole comparison."""
  if unit not in UNITS:
    raise ValueError(f"unknown data.unit {unit!r}; choose from {UNITS}")
  n = len(source)
  if unit == "comparison":
    return np.stack([np.arange(n), np.full(n, -1), np.full(n, -1)], axis=1).astype(np.int32)
  rows = []
  for start in range(0, n, 256):
    for offset, raw in enumerate(source.__getitems__(list(range(start, min(n, start + 256))))):
      record = decode_record(raw)
      if "responses" not in record:
        raise ValueError("data.unit='pair' needs comparison records (responses + grades or "
                         "ranking); this dataset holds single answers")
      rows.extend((start + offset, w, l) for w, l in comparison_pairs(record))
  return np.asarray(rows, np.int32).reshape(-1, 3)


def steps_per_epochs(n_elements: int, batch_size: int, process_count: int, epochs: int) -> int:
  """Global steps that cover `epochs` passes: every process has read its share by then."""
  local_batch = batch_size // process_count
  local_elements = math.ceil(n_elements / process_count)
  return max(1, math.ceil(epochs * local_elements / local_batch))


class ComparisonBatches:
  """Checkpointable iterator of this process's batches (numpy dicts, see the module doc).

  `stats` counts elements read, comparisons skipped for want of a pair, pairs dropped between
  identical answers and answers whose prompt was cut to fit seq_len.
  """

  def __init__(self, source, table: np.ndarray, encoder: Encoder, *, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, num_epochs: int | None = 1,
               shuffle: bool = True, read_threads: int = 2):
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} is not divisible by {process_count} processes")
    self.local_batch = batch_size // process_count
    self.encoder = encoder
    ds = grain.MapDataset.source(table)[process_index::process_count]
    if shuffle:
      ds = ds.shuffle(seed)
    if num_epochs != 1:
      ds = ds.repeat(num_epochs)

    def read(block: np.ndarray) -> dict[str, np.ndarray]:
      records = [decode_record(r) for r in source.__getitems__([int(i) for i in block[:, 0]])]
      pairs = [None if w < 0 else (int(w), int(l)) for w, l in block[:, 1:]]
      return encoder.encode_batch(records, pairs, self.local_batch)

    batches = ds.batch(self.local_batch, drop_remainder=False).map(read)
    self._it = iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                              prefetch_buffer_size=2)))
    self._stats = np.zeros(len(STAT_KEYS), np.int64)
    self.exhausted = False

  @property
  def stats(self) -> dict[str, int]:
    return {k: int(v) for k, v in zip(STAT_KEYS, self._stats)}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if not self.exhausted:
      try:
        batch = next(self._it)
        self._stats += batch.pop("stats")
        return batch
      except StopIteration:
        self.exhausted = True
        log.info("the reward data is spent: remaining steps get empty batches (not applied)")
    return self.encoder.empty(self.local_batch)

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "stats": self._stats.tolist(),
            "exhausted": self.exhausted}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state["grain"])
    self._stats = np.asarray(state["stats"], np.int64)
    self.exhausted = bool(state["exhausted"])


def read_records(name: str, split: str, data_dir: str | None, limit: int = 0) -> list[dict]:
  """Every record of a split as plain Python (the first `limit` if > 0), in file order."""
  source = load_source(name, split, data_dir)
  n = len(source) if limit <= 0 else min(limit, len(source))
  out = []
  for start in range(0, n, 256):
    rows = list(range(start, min(n, start + 256)))
    out.extend(decode_record(r) for r in source.__getitems__(rows))
  return out
