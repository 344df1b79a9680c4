"""Running a sweep: the shared base stages once, then one pipeline run per variant, one after
another in this process; a finished run is skipped and a failed one recorded, so the same
command goes on where an interrupted sweep stopped."""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
from typing import Any, Mapping, Sequence

from rlhf_jax.recipe import pipeline
from rlhf_jax.recipe.sweep import results
from rlhf_jax.recipe.sweep.overrides import apply_overrides
from rlhf_jax.recipe.sweep.spec import Run, Sweep, base_stages, prepare, select_runs
from rlhf_jax.recipe.sweep.status import FAILED_FILE, RUN_FILE, read_json, run_dir, run_status

log = logging.getLogger("rlhf_jax.recipe.sweep")


# ----------------------------------------------------------------------------- the shared base

def stages_by_status(config, workdir: str, stages: Sequence[str]) -> dict[str, list[str]]:
  """{"done": [...], "stale": [...], "missing": [...]}: the pipeline's own verdict
  (`pipeline.stage_status`) on each of `stages` in `workdir`, in pipeline order."""
  out: dict[str, list[str]] = {"done": [], "stale": [], "missing": []}
  for stage in stages:
    out[pipeline.stage_status(config, workdir, stage)].append(stage)
  return out


def _check_given_base(config, base: str, stages: Sequence[str]) -> None:
  """--base=W0 must have finished the shared stages; one stale there is only warned about,
  since W0 is the user's choice."""
  status = stages_by_status(config, base, stages)
  if status["missing"]:
    raise ValueError(f"--base={base} has not finished the stages {status['missing']} that the "
                     "runs read (no DONE.json): run the pipeline there first")
  if status["stale"]:
    log.warning("--base=%s: stages %s are stale (run with another config than the sweep's "
                "base, or before a stage they read was redone)", base, status["stale"])


def _finish_own_base(sweep: Sweep, config, base: str, stages: Sequence[str]) -> None:
  """Runs the shared stages in W/base from the first unfinished one on (a stage depends on
  all before it); a stale W/base is an error rather than silently reused."""
  status = stages_by_status(config, base, stages)
  if status["stale"]:
    raise ValueError(f"{base}: stages {status['stale']} are stale (run with another config "
                     f"than this sweep's base ({sweep.base}), or before a stage they read was "
                     f"redone); remove {base} or choose another --workdir")
  if not status["missing"]:
    print(f"[sweep] shared stages {list(stages)}: finished earlier in {base}")
    return
  redo = list(stages[stages.index(status["missing"][0]):])
  print(f"[sweep] shared stages {redo} in {base}")
  pipeline.run_pipeline(config, base, only=redo)
  missing = stages_by_status(config, base, stages)["missing"]
  if missing:
    raise RuntimeError(f"the shared stages {missing} did not finish in {base} (stopped "
                       "part-way?): run the sweep again to go on")


def prepare_base(sweep: Sweep, config, workdir: str, base: str | None) -> str | None:
  """The pipeline workdir the runs read their shared stages from, finished; None when START
  is the first stage (nothing shared).

  --base=W0 must have finished them already; otherwise they run in W/base.
  """
  stages = base_stages(sweep.start)
  if not stages:
    return None
  if base:
    _check_given_base(config, base, stages)
    return base
  base = os.path.join(workdir, "base")
  _finish_own_base(sweep, config, base, stages)
  return base


# ----------------------------------------------------------------------------- one variant

def run_settings(sweep: Sweep, run: Run, sets: Mapping[str, Any]) -> dict:
  """What makes a run what it is, as JSON gives it back (so a saved copy compares equal)."""
  return json.loads(json.dumps({"base": sweep.base, "start": sweep.start, "set": dict(sets),
                                "overrides": run.overrides}, default=str))


def check_same_settings(path: str, settings: dict) -> None:
  """A run directory made with other settings is never silently reused as this run."""
  old = read_json(os.path.join(path, RUN_FILE))
  if old is not None and old != settings:
    raise ValueError(f"{path} was run with other settings ({old}), not {settings}; remove it or "
                     "choose another --workdir")


def _one_line(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}".strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


def _start_attempt(path: str, settings: dict) -> None:
  """A fresh attempt: the last one's outcome goes, the settings are recorded."""
  os.makedirs(path, exist_ok=True)
  for old in (pipeline.SUMMARY, FAILED_FILE):
    if os.path.exists(os.path.join(path, old)):
      os.remove(os.path.join(path, old))
  with open(os.path.join(path, RUN_FILE), "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=1)


def run_variant(config, path: str, start: str, upstream: str | None, head: str) -> None:
  """One run of the pipeline in `path`; a failure is written to FAILED.txt, not raised, so
  the other runs still go."""
  t0 = time.time()
  try:
    if upstream is None:  # START is the first stage: nothing is shared
      pipeline.run_pipeline(config, path)
    else:  # redoes START and every later stage: an unfinished run starts over from START
      pipeline.run_pipeline(config, path, start=start, upstream=upstream)
  except Exception as e:  # pylint: disable=broad-except
    with open(os.path.join(path, FAILED_FILE), "w", encoding="utf-8") as f:
      f.write(traceback.format_exc())
    print(f"{head} FAILED after {time.time() - t0:.0f}s: {_one_line(e)} (traceback in "
          f"{os.path.join(path, FAILED_FILE)})", flush=True)
    return
  status, message = run_status(path)
  print(f"{head}: {status} in {time.time() - t0:.0f}s" + (f" ({message})" if message else ""),
        flush=True)


# ----------------------------------------------------------------------------- the sweep

def run_selected(sweep: Sweep, config, workdir: str, selected: Sequence[Run],
                 set_values: Mapping[str, Any], base: str | None) -> None:
  """The shared stages, then each selected run not finished earlier."""
  upstream = prepare_base(sweep, config, workdir, base)
  for i, run in enumerate(selected):
    path = run_dir(workdir, run.name)
    head = f"[sweep] run {i + 1}/{len(selected)} {run.name}"
    settings = run_settings(sweep, run, set_values)
    check_same_settings(path, settings)
    if run_status(path)[0] == "done":
      print(f"{head}: finished earlier, skipped")
      continue
    _start_attempt(path, settings)
    print(f"{head}: {run.overrides}", flush=True)
    run_variant(apply_overrides(config, run.overrides), path, sweep.start, upstream, head)


def run_sweep(sweep_path: str, workdir: str, *, base: str | None = None,
              runs: Sequence[str] | None = None, collect_only: bool = False,
              base_config: str | None = None, sets: Sequence[str] = ()) -> list[dict]:
  """Runs (or, with `collect_only`, only tabulates) a sweep; returns the rows of the table.

  `sets` are "key=value" strings set on the base config of every run (the --set flag).
  """
  sweep, config, set_values = prepare(sweep_path, base_config, sets)
  selected = select_runs(sweep, runs)
  if not collect_only:
    run_selected(sweep, config, workdir, selected, set_values, base)
  rows = results.collect(sweep, workdir)
  results.write_results(sweep, rows, workdir, set_values)
  return rows
