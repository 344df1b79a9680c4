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


def resume(ckpt, state, data_iter):
  """(state, start step): the latest checkpoint in `ckpt` restored into `state` (params,
  optimizer, step, rng) and `data_iter` moved to its saved position; (state, None) when there
  is none. One place for every trainer's resume."""
  start = ckpt.latest_step()
  if start is None:
    return state, None
  params, train_items, data_state, _ = ckpt.restore(start, state.params, state.train_items())
  state = state.replace(params=params, **train_items)
  if data_state:
    data_iter.set_state(data_state)
  log.info("resumed from %s at step %d", ckpt.directory, start)
  return state, start


def progress(total: int, initial: int, desc: str):
  """A tqdm bar on process 0 (to stderr), a silent stand-in elsewhere."""
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
              disable=jax.process_index() != 0, mininterval=0.5)


def run_train_loop(config, workdir: str, state, step_fn, data_iter, ckpt, make_batch, *,
                   start: int, total: int, loss_key: str = "train/loss", summarize=None,
                   after_step=None) -> dict:
  """The host loop every trainer shares: steps, logging, checkpoints, preemption, NaN stops.

  Only orchestration lives here; what differs between trainers comes in as functions:
    step_fn(state, batch) -> (state, device metrics); the metrics hold `loss_key` and
      'train/finite' (False: the step's update was not applied).
    make_batch(local numpy batch) -> global batch.
    summarize(host metrics, steps since last log, seconds since last log) -> (metrics to write,
      progress-bar postfix); the default writes the metrics as they are.
    after_step(done, state) -> extra metrics to write at step `done` ({} for none), e.g. a
      periodic held-out evaluation.
  Device metrics come to the host only on logging steps, and the finite check runs one step
  late, so no step waits for the previous one. Returns the last logged metrics.
  """
  import time
  from rlhf_jax.core.metrics import MetricWriter
  writer = MetricWriter(workdir)
  preemption = Preemption()
  config_json = config.to_dict()
  bar = progress(total, start, config.get("stage", "train"))
  last_metrics: dict = {}
  pending = None  # previous step's device metrics: checked one step late
  last_log_step, last_log_time = start, time.perf_counter()
  checkpoint_every = config.train.checkpoint_every or total

  def check(step_metrics, step):
    if not bool(step_metrics["train/finite"]):
      good = ckpt.latest_step()
      raise NonFiniteLossError(
          f"loss is {float(step_metrics[loss_key])} at step {step}: stopped. The last good "
          f"checkpoint ({'step ' + str(good) if good is not None else 'none'}) in "
          f"{ckpt.directory} is kept.")

  def save(done, force=False):
    ckpt.save(done, state.params, state.train_items(), data_iter.get_state(), config_json,
              force=force)

  try:
    for step in range(start, total):
      state, metrics = step_fn(state, make_batch(next(data_iter)))
      if pending is not None:
        check(jax.device_get(pending[0]), pending[1])
      pending = (metrics, step + 1)
      done = step + 1
      if done % config.train.log_every == 0 or done == total:
        host = jax.device_get(metrics)
        check(host, done)
        now = time.perf_counter()
        host = {k: float(v) for k, v in host.items() if k != "train/finite"}
        seconds = max(now - last_log_time, 1e-9)
        if summarize is None:
          postfix = {"loss": f"{host[loss_key]:.3f}"}
        else:
          host, postfix = summarize(host, done - last_log_step, seconds)
        last_log_step, last_log_time = done, now
        writer.write(done, host)
        bar.set_postfix(**postfix)
        last_metrics = host
      extra = after_step(done, state) if after_step is not None else {}
      if extra:
        writer.write(done, extra)
        last_metrics = {**last_metrics, **extra}
      bar.update(1)
      if done % checkpoint_every == 0 or done == total:
        save(done)
      if done == config.train.get("stop_after", 0):
        save(done, force=True)
        log.info("stopped after step %d as configured (train.stop_after)", done)
        break
      if preemption.requested():
        save(done, force=True)
        log.warning("preempted at step %d; checkpoint saved", done)
        last_metrics["preempted_at"] = done
        break
    if pending is not None:
      check(jax.device_get(pending[0]), pending[1])
  finally:
    bar.close()
    ckpt.close()
    writer.close()
    preemption.close()
  return last_metrics
