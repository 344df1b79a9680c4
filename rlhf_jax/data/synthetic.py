"""A deterministic synthetic token stream, for tests and benchmarks that must not depend on data.

Rows follow a learnable rule: token[t+1] = (token[t] + stride) mod V with a random start and a
stride from a small set, so a model's loss falls when it learns. The iterator has the same
interface as the real pipelines (dict batches, get_state / set_state), and its position is just
the batch counter, so resuming is exact.
"""
from __future__ import annotations

import numpy as np


class SyntheticLMIterator:

  def __init__(self, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
               process_index: int = 0, process_count: int = 1, first_token: int = 3):
    if batch_size % process_count:
      raise ValueError(f"global batch {batch_size} is not divisible by {process_count} processes")
    self.local_batch = batch_size // process_count
    self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.first_token = first_token
    self.position = 0

  def _rows(self, batch_index: int) -> np.ndarray:
    """This process's rows of global batch `batch_index`: the global batch is the same for
    any number of processes, so multi-host runs can be checked against one process."""
    rng = np.random.default_rng([self.seed, batch_index])
    global_batch = self.local_batch * self.process_count
    n_real = self.vocab_size - self.first_token
    start = rng.integers(0, n_real, size=(global_batch, 1))
    stride = rng.choice([1, 2, 3, 5], size=(global_batch, 1))
    t = np.arange(self.seq_len + 1)[None, :]
    rows = (start + stride * t) % n_real + self.first_token  # [B_global, T + 1]
    lo = self.process_index * self.local_batch
    return rows[lo:lo + self.local_batch]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = self._rows(self.position).astype(np.int32)
    self.position += 1
    b, t = self.local_batch, self.seq_len
    return {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "segment_ids": np.ones((b, t), np.int32),
        "loss_mask": np.ones((b, t), np.float32),
    }

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])
