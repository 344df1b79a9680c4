"""Metric logging: TensorBoard event files and a metrics.jsonl per run, written by process 0."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import jax
import numpy as np


class MetricWriter:
  """Writes {name: scalar} at a step to `workdir/metrics.jsonl` and TensorBoard events."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard events are a nicety; the JSONL is the record.
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), "time": time.time(),
                          **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}})
              + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def drop_after(self, step: int) -> None:
    """Forgets the records after `step`: a run resumed from its step-`step` checkpoint logs
    those steps again, and metrics.jsonl must read as one uninterrupted run."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
