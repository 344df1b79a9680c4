"""Where each run of a sweep lives and how far it got, read from what is on disk: the same
answer for the process that runs the sweep, for a later one that resumes it and for --collect.
"""
from __future__ import annotations

import os
from typing import Mapping

from rlhf_jax.core import metrics
from rlhf_jax.recipe import pipeline

RUN_FILE = "sweep_run.json"  # in each run's workdir: the settings it was run with
FAILED_FILE = "FAILED.txt"  # in each run's workdir: the traceback of its last failure


def run_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "runs", name)


def read_json(path: str):
  """The parsed file (a JSON object), or None when there is none; FileContentError naming the
  file when it is not one."""
  if not os.path.exists(path):
    return None
  return metrics.read_json(path)


def _failure(path: str) -> str:
  """The last line of a run's FAILED.txt: the exception, under its traceback."""
  with open(os.path.join(path, FAILED_FILE), encoding="utf-8", errors="replace") as f:
    lines = [line.strip() for line in f if line.strip()]
  return lines[-1][:300] if lines else "failed"


def run_status(path: str) -> tuple[str, str]:
  """(status, message) of a run's workdir.

  done     summary.json lists the last stage (the report) and no stopped one: the pipeline
           writes it also before the report and when a trainer stopped part-way, so its
           presence alone proves nothing
  failed   the last attempt raised (FAILED.txt; the message is the exception's line)
  stopped  a trainer stopped part-way (preempted, train.stop_after): run the sweep again
  pending  not run yet
  """
  summary = read_json(os.path.join(path, pipeline.SUMMARY))
  stages = (summary or {}).get("stages", {})
  stopped = [s for s, v in stages.items()
             if isinstance(v, Mapping) and v.get("status") == "stopped"]
  if summary is not None and not stopped and pipeline.STAGES[-1] in stages:
    return "done", ""
  if os.path.exists(os.path.join(path, FAILED_FILE)):
    return "failed", _failure(path)
  if stopped:
    return "stopped", str(stages[stopped[0]].get("message", ""))[:300]
  return "pending", ""
