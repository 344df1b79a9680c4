"""Pieces every host loop shares: preemption (SIGTERM), non-finite loss stops, progress bars."""
from __future__ import annotations

import logging
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """A loss went NaN/inf. The update of that step was not applied and nothing was saved."""


class Preemption:
  """Turns SIGTERM (how TPU pods and schedulers preempt) into a flag the loop polls.

  The loop then saves a checkpoint and returns normally, so the process exits 0 and the same
  command resumes. With several processes the flag is agreed on by all, so they stop together.
  """

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    log.warning("SIGTERM received: saving a checkpoint and stopping")
    self._flag.set()

  def requested(self) -> bool:
    local = self._flag.is_set()
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def progress(total: int, initial: int, desc: str):
  """A tqdm bar on process 0 (to stderr), a silent stand-in elsewhere."""
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
              disable=jax.process_index() != 0, mininterval=0.5)
