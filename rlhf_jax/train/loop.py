"""The one host loop every trainer runs: steps, logging, evaluation, checkpoints, stops.

Pretraining, SFT, the reward model, KTO, DPO and PPO all run `run_train_loop`; what differs
between them comes in as values and functions:

  state       a TrainState (train/state.py) or a PPOState (rl/ppo.py): both say what a
              checkpoint holds (`checkpoint_params`, `train_items`, `restored`) and which
              params an evaluator looks at (`eval_params`)
  step_fn     (state, batch) -> (state, metrics): one jitted update, or PPO's iteration
              (rollout -> experience -> update); metrics hold the loss and 'train/finite'
  data        an iterator with get_state / set_state (a `Composite` for several streams)
  evaluations [Evaluation(evaluator, every)]: evaluator(step, params) -> metrics

Only orchestration lives here. Device metrics come to the host only on logging steps, and the
finite check runs one step late, so no step waits for the previous one; a step whose state is
about to be saved or evaluated is checked first (a NaN learning rate leaves NaN params in the
state, train/state.apply_update_if, and those must never be saved).
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from rlhf_jax.core import host_memory
from rlhf_jax.core.metrics import MetricWriter

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
  """A loss or the updated params went NaN/inf. Nothing of that step was saved."""


def is_time(step: int, every: int, total: int) -> bool:
  """Whether step `step` (counted from 1) is due: every `every`-th step and always the last;
  every <= 0 means only the last."""
  return step == total or (every > 0 and step % every == 0)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """An evaluator, evaluator(step, params) -> metrics, run every `every` steps (0: at the end)."""
  evaluator: Callable[[int, Any], dict]
  every: int = 0


class Composite:
  """Several data streams stepped together, e.g. PPO's prompts and its pretraining batches;
  a stream may be None (left out). Its state is the streams' states by name."""

  def __init__(self, **streams):
    self.streams = streams

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return {name: next(s) for name, s in self.streams.items() if s is not None}

  def get_state(self) -> dict:
    return {name: (s.get_state() if s is not None else None) for name, s in self.streams.items()}

  def set_state(self, state: dict) -> None:
    for name, s in self.streams.items():
      if s is not None and state.get(name):
        s.set_state(state[name])


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


def resume(ckpt, state, data):
  """(state, start step): the latest checkpoint in `ckpt` restored into `state` and `data`
  moved to its saved position; (state, None) when there is none."""
  start = ckpt.latest_step()
  if start is None:
    return state, None
  params, items, data_state, _ = ckpt.restore(start, state.checkpoint_params(),
                                              state.train_items())
  state = state.restored(params, items)
  if data_state:
    data.set_state(data_state)
  log.info("resumed from %s at step %d", ckpt.directory, start)
  return state, start


def progress(total: int, initial: int, desc: str):
  """A tqdm bar on process 0 (to stderr), a silent stand-in elsewhere."""
  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
              disable=jax.process_index() != 0, mininterval=0.5)


def evaluate_due(evaluations: Sequence[Evaluation], done: int, total: int, state,
                 force: bool = False) -> dict:
  """The metrics of every evaluation due at step `done` (all of them with `force`)."""
  out: dict = {}
  for e in evaluations:
    if force or is_time(done, e.every, total):
      out.update(e.evaluator(done, state.eval_params()))
  return out


@dataclasses.dataclass
class _Log:
  """What the loop remembers between logging steps."""
  step: int
  time: float
  metrics: dict = dataclasses.field(default_factory=dict)


def _check(metrics, step: int, loss_key: str, ckpt) -> None:
  if not bool(metrics["train/finite"]):
    good = ckpt.latest_step()
    raise NonFiniteLossError(
        f"loss is {float(metrics[loss_key])} (or the updated params are not finite) at step "
        f"{step}: stopped. The last good checkpoint "
        f"({'step ' + str(good) if good is not None else 'none'}) in {ckpt.directory} is kept.")


def _host_metrics(metrics, done: int, window: _Log, loss_key: str, ckpt, summarize):
  """(metrics to write, progress-bar postfix) of a logging step; checks they are finite."""
  host = jax.device_get(metrics)
  _check(host, done, loss_key, ckpt)
  now = time.perf_counter()
  host = {k: float(v) for k, v in host.items() if k != "train/finite"}
  seconds = max(now - window.time, 1e-9)
  if summarize is None:
    postfix = {"loss": f"{host[loss_key]:.3f}"}
  else:
    host, postfix = summarize(host, done - window.step, seconds)
  window.step, window.time = done, now
  return host, postfix


def _reads_state(done: int, total: int, train, evaluations: Sequence[Evaluation],
                 preemption: "Preemption") -> bool:
  """Whether step `done`'s state is saved or evaluated (what save_or_stop and evaluate_due do)."""
  return (is_time(done, train.checkpoint_every, total) or done == train.get("stop_after", 0)
          or preemption.requested() or any(is_time(done, e.every, total) for e in evaluations))


def save_or_stop(done: int, total: int, state, data, ckpt, config_json: dict, train,
                 preemption: Preemption, window: _Log) -> bool:
  """Saves a checkpoint when one is due; True (after a forced save) when the run stops here:
  train.stop_after reached, or preempted."""
  def save(force=False):
    ckpt.save(done, state.checkpoint_params(), state.train_items(), data.get_state(),
              config_json, force=force)

  if is_time(done, train.checkpoint_every, total):
    save()
  if done == train.get("stop_after", 0):
    save(force=True)
    log.info("stopped after step %d as configured (train.stop_after)", done)
    return True
  if preemption.requested():
    save(force=True)
    log.warning("preempted at step %d; checkpoint saved", done)
    window.metrics["preempted_at"] = done
    return True
  return False


def run_train_loop(config, workdir: str, state, step_fn, data, ckpt,
                   make_batch: Callable = lambda batch: batch, *, total: int,
                   loss_key: str = "train/loss", summarize: Optional[Callable] = None,
                   evaluations: Sequence[Evaluation] = ()) -> tuple[Any, dict]:
  """Runs steps int(state.step)+1 .. total. Returns (final state, last metrics).

  summarize(host metrics, steps since the last log, seconds since it) -> (metrics to write,
  progress-bar postfix); the default writes the metrics as they are. A run that had already
  finished runs its evaluations once and returns their metrics (nothing is written).
  """
  start = int(state.step)
  if start >= total:
    ckpt.close()
    return state, evaluate_due(evaluations, total, total, state, force=True)
  writer = MetricWriter(workdir)
  writer.drop_after(start)  # a resumed run writes again what came after its checkpoint
  preemption = Preemption()
  config_json = config.to_dict()
  bar = progress(total, start, config.get("stage", "train"))
  window = _Log(start, time.perf_counter())
  pending = None  # the previous step's device metrics: checked one step late
  train = config.train

  try:
    for step in range(start, total):
      state, metrics = step_fn(state, make_batch(next(data)))
      if pending is not None:
        _check(jax.device_get(pending[0]), pending[1], loss_key, ckpt)
      done = step + 1
      pending = (metrics, done)
      logged = {}
      if is_time(done, train.log_every, total):
        logged, postfix = _host_metrics(metrics, done, window, loss_key, ckpt, summarize)
        bar.set_postfix(**postfix)
        window.metrics = dict(logged)  # the last logged metrics, not a merge of all of them
        pending = None
      if pending is not None and _reads_state(done, total, train, evaluations, preemption):
        _check(jax.device_get(pending[0]), pending[1], loss_key, ckpt)
        pending = None
      evaluated = evaluate_due(evaluations, done, total, state)
      if step == start or evaluated:  # compiles happened: hand their freed heap back
        host_memory.release_freed_memory()
      window.metrics.update(evaluated)
      if logged or evaluated:
        writer.write(done, {**logged, **evaluated})
      bar.update(1)
      if save_or_stop(done, total, state, data, ckpt, config_json, train, preemption, window):
        break
    if pending is not None:
      _check(jax.device_get(pending[0]), pending[1], loss_key, ckpt)
  finally:
    bar.close()
    ckpt.close()
    writer.close()
    preemption.close()
  return state, window.metrics
