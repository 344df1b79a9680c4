"""Metric logging: TensorBoard event files and a metrics.jsonl per run, written by process 0;
and the readers of the JSON records a run leaves (metrics.jsonl, summaries, results), which name
the file and line of whatever cannot be read instead of failing with a bare parser message."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np


def _tensorboard_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch when torch is not loaded yet.

  tensorboardX imports torch at import time, only to accept torch tensors; this project logs
  floats. Where torch is installed (the test extras, a transformers environment) that import
  took 10 s of every process's first metric write on a 2-core CPU. Marking torch unimportable
  for the duration of the import makes tensorboardX fall back to numpy; a later `import torch`
  anywhere else is unaffected."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter(logdir)
  sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter(logdir)


class MetricWriter:
  """Writes {name: scalar} at a step to `workdir/metrics.jsonl` and TensorBoard events."""

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))
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
    those steps again, and metrics.jsonl must read as one uninterrupted run. A last line cut
    short (the run was killed while appending it) is dropped too; any other bad line is an
    error naming it."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path, "rb") as f:
      lines = f.read().split(b"\n")
    cut = lines.pop()  # what follows the last newline: nothing, unless a kill cut a line short
    try:
      json.loads(cut)
      lines.append(cut + b"\n")  # complete, only its newline missing
    except ValueError:  # bad JSON or UTF-8: the unfinished line is dropped
      pass
    kept = []
    for number, line in enumerate(lines, 1):
      if line.strip():
        where = f"{self.path}:{number}"
        record = check_type(decode_json(line, where), dict, where)
        if metric_step(where, record) <= step:
          kept.append(line.rstrip(b"\n") + b"\n")
    if len(kept) != sum(1 for line in lines if line.strip()) or cut:
      with open(self.path + ".tmp", "wb") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl` ([] when there is none), each with its step."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  records = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      where = f"{path}:{number}"
      record = check_type(decode_json(line, where), dict, where)
      metric_step(where, record)
      records.append(record)
  return records


def metric_step(where: str, record: dict) -> int:
  """A metrics record's step, or FileContentError at `where` (path:line) when it has none."""
  step = record.get("step")
  if isinstance(step, bool) or not isinstance(step, int):
    raise FileContentError(f"{where}: a record without an integer 'step': "
                           f"{json.dumps(record)[:80]}")
  return step


# ---------------------------------------------------------------------------------------------
# Reading JSON records with the file (and line) in every error.


class FileContentError(ValueError):
  """A file whose content is not what the project wrote there (cut short, edited by hand,
  corrupted): the message starts with `path[:line]: `, so one knows which file to fix."""


def decode_json(data: bytes, where: str, line_numbers: bool = False) -> Any:
  """The JSON value of `data`; FileContentError starting with `where` (and `:line` with
  `line_numbers`, for a whole document) on bad UTF-8, bad JSON, or nesting too deep to parse."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise FileContentError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                           f"{e.start})") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    line = f":{e.lineno}" if line_numbers else ""
    raise FileContentError(f"{where}{line}: not valid JSON ({e.msg}, column {e.colno})") from None
  except RecursionError:
    raise FileContentError(f"{where}: JSON nested too deeply to read") from None


def check_type(value: Any, expect: Optional[type], where: str) -> Any:
  if expect is not None and not isinstance(value, expect):
    names = {dict: "a JSON object", list: "a JSON array"}
    raise FileContentError(f"{where}: expected {names.get(expect, expect.__name__)}, got "
                           f"{type(value).__name__}")
  return value


def read_json(path: str, expect: Optional[type] = dict) -> Any:
  """The JSON document in `path` (of type `expect`, unless None); FileContentError naming the
  file (and line) when it is not."""
  with open(path, "rb") as f:
    data = f.read()
  return check_type(decode_json(data, path, line_numbers=True), expect, path)


def parse_json_lines(path: str, lines, expect: Optional[type] = dict) -> list:
  """The JSON value of each non-blank line of `path` (`lines`: its lines as bytes)."""
  out = []
  for number, line in enumerate(lines, 1):
    if line.strip():
      where = f"{path}:{number}"
      out.append(check_type(decode_json(line, where), expect, where))
  return out


def read_json_lines(path: str, expect: Optional[type] = dict) -> list:
  """Every non-blank line of a JSONL file parsed; FileContentError `path:line: ...` for the
  first line that is not JSON (or not `expect`)."""
  with open(path, "rb") as f:
    return parse_json_lines(path, f)
