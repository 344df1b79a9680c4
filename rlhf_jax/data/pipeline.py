"""grain input pipelines over the TFDS datasets: shard, shuffle, tokenize, pack, batch.

    tfds.data_source(name, split)                      array_record, random access
      -> MapDataset.range(n)[process_index::count]     this process's record indices
      -> .shuffle(seed).repeat(num_epochs)             a new order every epoch
      -> .batch(read_block).map(read_and_tokenize)     one batched read per block: reading
                                                       records one at a time is ~5x slower
      -> .to_iter_dataset(ReadOptions(threads))        blocks read ahead in threads
      -> PackedBatchIterDataset                        examples packed first-fit, in order,
                                                       into the rows of a local batch

Batches are numpy dicts:
    inputs       [B, T] int32    token ids
    targets      [B, T] int32    the next token of the same example; pad_id elsewhere
    positions    [B, T] int32    0, 1, 2... restarting at every packed example
    segment_ids  [B, T] int32    1, 2, 3... per packed example in a row; 0 on padding
    loss_mask    [B, T] float32  mask[t + 1] of the example (the caller's mask says which
                                 tokens are trained; position t predicts token t + 1); 0 on
                                 padding and on an example's last token, whose target would
                                 be the next example

The iterator is a grain `DatasetIterator`: `get_state()` is a JSON-serialisable dict and
`set_state(state)` makes the next batch exactly the one that followed the saved state; grain's
orbax handler can save it with the model. `iterator.stats` counts examples, truncations
(examples longer than seq_len keep their first seq_len tokens), tokens and padding.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import grain
import numpy as np
from rlhf_jax.config import util as config_util
from rlhf_jax.data import builders

log = logging.getLogger(__name__)

TokenizeFn = Callable[[dict[str, Any]], tuple[np.ndarray, np.ndarray]]
Example = tuple[np.ndarray, np.ndarray]  # (ids [L] int32, mask [L] int32)

STAT_KEYS = ("examples", "truncated", "empty", "batches", "tokens", "loss_tokens",
             "pad_tokens")


# ---------------------------------------------------------------------------------------------
# Reading.


def load_source(name: str, split: str, data_dir: str | None) -> Any:
  """The TFDS array_record data source of a split; a bundled dataset not prepared yet is
  prepared first. A missing or empty split is a ValueError naming dataset and split."""
  data_dir = builders.resolve_data_dir(data_dir)
  builder = builders.open_builder(name, data_dir)
  try:
    source = builder.as_data_source(split=split)
  except (ValueError, KeyError) as e:
    raise ValueError(f"dataset {name!r} has no split {split!r} in {data_dir} (it has "
                     f"{sorted(builder.info.splits)}): {e}") from e
  if len(source) == 0:
    raise ValueError(f"dataset {name!r} split {split!r} in {data_dir} is empty")
  return source


def decode_value(value: Any) -> Any:
  """bytes -> str, numpy scalars -> int/float, lists element-wise."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return [decode_value(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, list):
    return [decode_value(v) for v in value]
  return value


def decode_record(record: dict[str, Any]) -> dict[str, Any]:
  """A TFDS record as plain Python, the way it was written.

  TFDS hands back text as bytes and a Sequence of dicts column-wise ({role: [...],
  content: [...]}); this turns `messages` back into [{role, content}, ...].
  """
  out = {}
  for key, value in record.items():
    if isinstance(value, dict):
      columns = {k: decode_value(v) for k, v in value.items()}
      n = len(next(iter(columns.values()))) if columns else 0
      out[key] = [{k: columns[k][i] for k in columns} for i in range(n)]
    else:
      out[key] = decode_value(value)
  return out


def _checked_example(record: dict[str, Any], tokenize_fn: TokenizeFn) -> Example:
  ids, mask = tokenize_fn(record)
  ids = np.asarray(ids, np.int32)
  mask = np.asarray(mask, np.int32)
  if ids.ndim != 1 or ids.shape != mask.shape:
    raise ValueError(f"tokenize_fn must return ids [T] and loss mask [T]; got "
                     f"{ids.shape} and {mask.shape} for record {record.get('id')!r}")
  return ids, mask


def parse_lang_repeat(text: str) -> dict[str, int]:
  """`data.lang_repeat` ('zh:100,en:1') as {lang: times per epoch}."""
  return config_util.parse_by_lang(text, "data.lang_repeat", what="times", integer=True,
                                   minimum=1)


def record_order(source: Any, lang_repeat: dict[str, int] | None) -> np.ndarray:
  """[N'] record indices of one epoch: each record once, or `lang_repeat[lang]` times.

  Why: SFT's bundled dialogues are 99.7% English tokens; repeating the few Chinese records
  gives Chinese a share of a short run's steps without weighting the loss. Reads every
  record's `lang` once (the dialogue datasets are thousands of records)."""
  n = len(source)
  if not lang_repeat:
    return np.arange(n)
  langs = [decode_value(r["lang"]) for r in source.__getitems__(list(range(n)))]
  missing = sorted(set(lang_repeat) - set(langs))
  if missing:
    raise ValueError(f"data.lang_repeat names {missing}, which no record has (langs here: "
                     f"{sorted(set(langs))})")
  return np.repeat(np.arange(n), [lang_repeat.get(lang, 1) for lang in langs])


def make_example_blocks(source: Any, *, tokenize_fn: TokenizeFn, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None, shuffle: bool = True,
                        read_block: int = 64, read_threads: int = 2,
                        name: str = "dataset", split: str = "split",
                        lang_repeat: dict[str, int] | None = None) -> grain.IterDataset:
  """IterDataset of blocks (lists) of tokenized examples from this process's shard."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  order = record_order(source, lang_repeat)
  indices = grain.MapDataset.source(order)[process_index::process_count]
  if len(indices) == 0:
    raise ValueError(f"dataset {name!r} split {split!r} has {len(source)} records: none for "
                     f"process {process_index} of {process_count}")
  if shuffle:
    indices = indices.shuffle(seed)
  if num_epochs != 1:
    indices = indices.repeat(num_epochs)

  def read_and_tokenize(block: np.ndarray) -> list[Example]:
    records = source.__getitems__([int(i) for i in block])
    return [_checked_example(decode_record(r), tokenize_fn) for r in records]

  blocks = indices.batch(read_block).map(read_and_tokenize)
  return blocks.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                  prefetch_buffer_size=max(2, read_threads)))


# ---------------------------------------------------------------------------------------------
# Packing.


def build_batch(rows: Sequence[Sequence[Example]], batch_size: int, seq_len: int,
                pad_id: int = 0) -> dict[str, np.ndarray]:
  """Lays out rows of examples (each already <= seq_len tokens in total) as a batch."""
  inputs = np.full((batch_size, seq_len), pad_id, np.int32)     # [B, T]
  targets = np.full((batch_size, seq_len), pad_id, np.int32)    # [B, T]
  positions = np.zeros((batch_size, seq_len), np.int32)         # [B, T]
  segment_ids = np.zeros((batch_size, seq_len), np.int32)       # [B, T]
  loss_mask = np.zeros((batch_size, seq_len), np.float32)       # [B, T]
  for r, row in enumerate(rows):
    start = 0
    for segment, (ids, mask) in enumerate(row, 1):
      end = start + len(ids)
      inputs[r, start:end] = ids
      targets[r, start:end - 1] = ids[1:]
      positions[r, start:end] = np.arange(len(ids))
      segment_ids[r, start:end] = segment
      loss_mask[r, start:end - 1] = mask[1:]
      start = end
  return {"inputs": inputs, "targets": targets, "positions": positions,
          "segment_ids": segment_ids, "loss_mask": loss_mask}


class _PackedBatchIterator(grain.DatasetIterator):
  """Fills the rows of one batch first-fit, in input order, and emits it when an example fits
  in none of them (packing) or when every row holds one example (no packing).

  Checkpointing: an example read but left for the next batch is "un-read" by stepping back
  within the current block, so the state is only (parent state before the current block,
  offset within it, counters) -- no tokens are ever stored in a checkpoint.
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int, seq_len: int,
               pack: bool, pad_id: int, drop_remainder: bool, label: str):
    super().__init__(parent)
    self._batch_size, self._seq_len, self._pack = batch_size, seq_len, pack
    self._pad_id, self._drop_remainder, self._label = pad_id, drop_remainder, label
    self._block: list[Example] | None = None
    self._block_state = self._parent.get_state()
    self._offset = 0
    self._counters = dict.fromkeys(STAT_KEYS, 0)
    self._warned = False

  @property
  def stats(self) -> dict[str, int]:
    """Counters since the start: examples packed, truncated (longer than seq_len), empty
    (no tokens, skipped), batches, tokens, loss_tokens and pad_tokens emitted."""
    return dict(self._counters)

  def _read(self) -> Example:
    while self._block is None or self._offset >= len(self._block):
      state = self._parent.get_state()
      block = next(self._parent)  # StopIteration: the data has ended.
      self._block, self._block_state, self._offset = block, state, 0
    example = self._block[self._offset]
    self._offset += 1
    return example

  def _unread(self) -> None:
    self._offset -= 1

  def _fit(self, ids: np.ndarray, mask: np.ndarray) -> Example:
    if len(ids) > self._seq_len:
      self._counters["truncated"] += 1
      if not self._warned:
        log.warning("%s: an example of %d tokens was truncated to seq_len=%d (counted in "
                    "iterator.stats['truncated'])", self._label, len(ids), self._seq_len)
        self._warned = True
      return ids[:self._seq_len], mask[:self._seq_len]
    return ids, mask

  def _place(self, rows: list[list[Example]], used: list[int], length: int) -> int | None:
    """Row index that takes `length` more tokens (opening a row if needed), or None."""
    if self._pack:
      for r, n in enumerate(used):
        if n + length <= self._seq_len:
          return r
    if len(rows) < self._batch_size:
      rows.append([])
      used.append(0)
      return len(rows) - 1
    return None

  def __next__(self) -> dict[str, np.ndarray]:
    rows: list[list[Example]] = []
    used: list[int] = []
    while True:
      if not self._pack and len(rows) == self._batch_size:
        break
      try:
        ids, mask = self._read()
      except StopIteration:
        if not rows or (self._drop_remainder and len(rows) < self._batch_size):
          raise
        break
      if len(ids) == 0:
        self._counters["empty"] += 1
        continue
      length = min(len(ids), self._seq_len)
      r = self._place(rows, used, length)
      if r is None:
        self._unread()
        break
      ids, mask = self._fit(ids, mask)
      rows[r].append((ids, mask))
      used[r] += length
      self._counters["examples"] += 1
    batch = build_batch(rows, self._batch_size, self._seq_len, self._pad_id)
    self._count_batch(batch)
    return batch

  def _count_batch(self, batch: dict[str, np.ndarray]) -> None:
    real = int((batch["segment_ids"] > 0).sum())
    self._counters["batches"] += 1
    self._counters["tokens"] += real
    self._counters["pad_tokens"] += batch["inputs"].size - real
    self._counters["loss_tokens"] += int(batch["loss_mask"].sum())

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._block_state, "offset": self._offset, "stats": dict(self._counters)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._block_state = state["parent"]
    self._counters = {k: int(state["stats"].get(k, 0)) for k in STAT_KEYS}
    self._block, self._offset = None, int(state["offset"])
    if self._offset:  # Read the saved block again; `_read` goes on at the saved offset.
      self._block = next(self._parent)


class PackedBatchIterDataset(grain.IterDataset):
  """Blocks of tokenized examples -> numpy batches of [batch_size, seq_len] (see module doc)."""

  def __init__(self, parent: grain.IterDataset, *, batch_size: int, seq_len: int,
               pack: bool = True, pad_id: int = 0, drop_remainder: bool = False,
               label: str = "pipeline"):
    super().__init__(parent)
    if batch_size < 1 or seq_len < 2:
      raise ValueError(f"need batch_size >= 1 and seq_len >= 2; got {batch_size}, {seq_len}")
    self._args = dict(batch_size=batch_size, seq_len=seq_len, pack=pack, pad_id=pad_id,
                      drop_remainder=drop_remainder, label=label)

  def __iter__(self) -> _PackedBatchIterator:
    return _PackedBatchIterator(self._parent.__iter__(), **self._args)

  def __str__(self) -> str:
    return f"PackedBatchIterDataset({self._args})"


# ---------------------------------------------------------------------------------------------
# Entry points.


def make_lm_dataset(name: str, split: str, *, data_dir: str | None, batch_size: int, seq_len: int,
                    tokenize_fn: TokenizeFn, seed: int, process_index: int = 0,
                    process_count: int = 1, pack: bool = True, num_epochs: int | None = None,
                    shuffle: bool = True, pad_id: int = 0, drop_remainder: bool = False,
                    read_block: int = 64, read_threads: int = 2,
                    lang_repeat: dict[str, int] | None = None) -> PackedBatchIterDataset:
  """The IterDataset behind `make_lm_iterator` (iterate it again for a fresh start)."""
  if batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} is not divisible by process_count "
                     f"{process_count}")
  source = load_source(name, split, data_dir)
  blocks = make_example_blocks(source, tokenize_fn=tokenize_fn, seed=seed,
                               process_index=process_index, process_count=process_count,
                               num_epochs=num_epochs, shuffle=shuffle, read_block=read_block,
                               read_threads=read_threads, name=name, split=split,
                               lang_repeat=lang_repeat)
  return PackedBatchIterDataset(blocks, batch_size=batch_size // process_count,
                                seq_len=seq_len, pack=pack, pad_id=pad_id,
                                drop_remainder=drop_remainder,
                                label=f"{name}[{split}] process {process_index}")


def make_lm_iterator(name: str, split: str, *, data_dir: str | None, batch_size: int, seq_len: int,
                     tokenize_fn: TokenizeFn, seed: int, process_index: int = 0,
                     process_count: int = 1, pack: bool = True,
                     num_epochs: int | None = None, **kwargs) -> _PackedBatchIterator:
  """Checkpointable iterator of this process's batches: [batch_size // process_count, seq_len].

  Args:
    name: TFDS name, e.g. "rlhf_dialogues" or "rlhf_dialogues/my_chats".
    split: "train", "validation", "test" (or any TFDS split expression).
    data_dir: where the dataset is prepared (None: ~/.cache/rlhf_jax/tfds); a bundled
      dataset missing there is prepared on first use.
    batch_size: global batch size; each process yields its local share.
    seq_len: row length T. Longer examples are truncated and counted (`stats['truncated']`).
    tokenize_fn: record (plain Python, see `decode_record`) -> (ids [L], loss mask [L]).
    seed: shuffling seed; the same seed gives the same batches.
    process_index, process_count: this process's disjoint shard of the records.
    pack: several examples per row (first-fit in order) or one example per row.
    num_epochs: None repeats forever; otherwise the last batch may be part-empty.
    **kwargs: shuffle, pad_id, drop_remainder, read_block, read_threads, lang_repeat.
  """
  return iter(make_lm_dataset(name, split, data_dir=data_dir, batch_size=batch_size,
                              seq_len=seq_len, tokenize_fn=tokenize_fn, seed=seed,
                              process_index=process_index, process_count=process_count,
                              pack=pack, num_epochs=num_epochs, **kwargs))


def make_record_iterator(name: str, split: str, *, data_dir: str | None, batch_size: int,
                         seed: int, process_index: int = 0, process_count: int = 1,
                         num_epochs: int | None = None, shuffle: bool = True,
                         drop_remainder: bool = True, read_threads: int = 2
                         ) -> grain.DatasetIterator:
  """Checkpointable iterator of lists of decoded records (this process's share of each global
  batch), for stages that batch records rather than tokens: prompts for PPO, comparisons
  for the reward model, thumbs for KTO. grain's own iterator state resumes it exactly."""
  if batch_size % process_count:
    raise ValueError(f"global batch_size {batch_size} is not divisible by process_count "
                     f"{process_count}")
  source = load_source(name, split, data_dir)
  indices = grain.MapDataset.range(len(source))[process_index::process_count]
  if len(indices) == 0:
    raise ValueError(f"dataset {name!r} split {split!r} has {len(source)} records: none for "
                     f"process {process_index} of {process_count}")
  if shuffle:
    indices = indices.shuffle(seed)
  if num_epochs != 1:
    indices = indices.repeat(num_epochs)
  batches = indices.batch(batch_size // process_count, drop_remainder=drop_remainder).map(
      lambda block: [decode_record(r) for r in source.__getitems__([int(i) for i in block])])
  return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                        prefetch_buffer_size=2)))


def byte_tokenize_fn(record: dict[str, Any]) -> Example:
  """A tokenizer-free tokenize_fn: UTF-8 bytes + 1 (0 stays the pad id), for tests and
  benchmarks. Text records train on every token; dialogues only on the assistant's bytes."""
  if "messages" in record:
    ids, mask = [], []
    for message in record["messages"]:
      data = list((message["content"] + "\n").encode("utf-8"))
      ids.extend(b + 1 for b in data)
      mask.extend([int(message["role"] == "assistant")] * len(data))
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)
  text = record.get("text")
  if text is None:
    text = record.get("prompt", "") + "\n" + record.get("response", "")
  ids = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + 1
  return ids, np.ones_like(ids)
