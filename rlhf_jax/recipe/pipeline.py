r"""The whole recipe in one command: each stage in its own directory, each resumable.

  python -m rlhf_jax.recipe.pipeline --config=configs/pipeline.py[:args] [--config.x.y=v ...] \
      --workdir=W [--only=rm,ppo] [--from=ppo] [--upstream=W0]

Stages, in order (configs/pipeline.py holds one section per stage):
  tokenizer    sentencepiece on the bundled English + Chinese text     W/tokenizer/
  pretrain     next-token training on packed text                       W/pretrain/
  sft          assistant-only loss on dialogues                         W/sft/
  comparisons  K answers per prompt from SFT, graded by simulated       W/comparisons/tfds/
               annotators calibrated to people's agreement
  rm           reward model on those comparisons                        W/rm/
  ppo          the SFT policy against the RM, KL penalty to SFT         W/ppo/
  kto          SFT fine-tuned on the real human likes / dislikes        W/kto/
  dpo          SFT fine-tuned on the comparisons' pairs, no RM          W/dpo/
  evaluate     every policy on held-out prompts: gold, win rate vs SFT  W/evaluate/results.json
  report       W/report.md and W/plots/*.png                            (always rebuilt)

With a pretrained model (config.model: a preset, an HF directory or a .gguf file), the model
stands in for the tokenizer stage (its own tokenizer and chat template) and, unless
config.continue_pretraining, for the pretrain stage (its weights are SFT's init_from): neither
runs nor has a directory, and the summary and report say where they came from.

A finished stage writes W/<stage>/DONE.json (seconds, key metrics, config hash), atomically and
last; a re-run skips it. A trainer stopped part-way (killed, SIGTERM, train.stop_after) has no
DONE.json: the same command resumes it from its checkpoint. Stages that write data (comparisons,
evaluate) start over when unfinished: their output is taken as complete only with DONE.json.

`--only=a,b` redoes exactly those stages; `--from=s` redoes s and every later stage. A redone
stage's output is deleted first, unless it was interrupted under the same config: then the
same command, run again, continues it. `--upstream=W0` takes every stage that is not redone
here from the finished pipeline workdir W0 (it must have finished them): sweeps share one
tokenizer, pretraining, SFT and RM this way. The report is rebuilt at the end of every
invocation.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time

from absl import app, flags

from rlhf_jax.config import overrides, validate
from rlhf_jax.recipe.markers import (  # noqa: F401 (the pipeline's public names, re-exported)
    DEPENDS, DONE, OPTIONAL, POLICIES, STAGES, STARTED, SUMMARY, TRAINED, MarkerError,
    MissingStageError, StageStopped, config_hash, done_time, last_values, parse_langs,
    parse_stages, read_done, read_marker, replaced_by_model, stage_status, write_json_atomic)
from rlhf_jax.recipe.stages import STAGE_FNS, Context  # noqa: F401 (re-exported)
from rlhf_jax.eval.report import machine_info
from rlhf_jax.core.logs import setup_logging

log = logging.getLogger("rlhf_jax.recipe.pipeline")


# ---------------------------------------------------------------------------------------------
# The driver.


def _say(line: str) -> None:
  print(line, flush=True)


def _cpu_seconds() -> float:
  import resource
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _run_one(ctx: Context, stage: str) -> dict:
  stage_dir = os.path.join(ctx.workdir, stage)
  expected = config_hash(ctx.config, stage)
  done = read_done(stage_dir) if stage != "report" else None
  if done is not None:
    _say(f"[{stage}] done earlier: skipped")
    if done.get("config_hash") != expected:
      log.warning("[%s] was finished with a different config (hash %s, now %s); its output "
                  "is kept: pass --only=%s or --from=%s to redo it", stage,
                  done.get("config_hash"), expected, stage, stage)
    newer = [d for d in DEPENDS.get(stage, ()) if done_time(ctx.stage_dir(d))
             > done_time(stage_dir)]
    if newer:
      log.warning("[%s] was finished before %s was redone: its output is stale; pass "
                  "--only=%s to refresh it", stage, ", ".join(newer), stage)
    return {**done, "status": "skipped", "dir": stage_dir}
  if stage not in TRAINED and stage != "report" and os.path.isdir(stage_dir):
    clear_stage(stage_dir, stage)  # unfinished data: start over rather than trust part of it
  started = read_marker(stage_dir, STARTED)
  if started and started.get("config_hash") != expected:
    log.warning("[%s] resuming a run started with a different config (hash %s, now %s): "
                "pass --only=%s to start it afresh", stage, started.get("config_hash"),
                expected, stage)
  os.makedirs(stage_dir, exist_ok=True)
  if stage != "report":
    write_json_atomic(os.path.join(stage_dir, STARTED), {"config_hash": expected})
  start, cpu = time.time(), _cpu_seconds()
  # Whatever a stage's libraries print (TFDS announces every dataset it prepares) goes to
  # stderr with the progress bars: stdout holds one line per stage.
  with contextlib.redirect_stdout(sys.stderr):
    metrics, line = STAGE_FNS[stage](ctx)
  seconds = time.time() - start
  # CPU seconds too: on a shared machine wall time says more about the neighbours.
  record = {"stage": stage, "seconds": round(seconds, 2),
            "cpu_seconds": round(_cpu_seconds() - cpu, 2), "metrics": metrics, "line": line,
            "config_hash": expected, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
  if stage != "report":
    write_json_atomic(os.path.join(stage_dir, DONE), record)
  _say(f"[{stage}] {seconds:.0f}s  {line}")
  return {**record, "status": "ran", "dir": stage_dir}


# Stages whose output is one file written atomically at the end: a redo keeps the old file
# until the new one replaces it, so a redo that fails (a broken SFT, say) loses nothing.
REPLACED_ON_SUCCESS = ("evaluate",)


def clear_stage(stage_dir: str, stage: str) -> None:
  """Forgets a stage before it runs again: its markers, and its outputs unless they are
  replaced only when the new ones are complete (REPLACED_ON_SUCCESS)."""
  if stage not in REPLACED_ON_SUCCESS:
    shutil.rmtree(stage_dir, ignore_errors=True)
    return
  for marker in (DONE, STARTED):
    if os.path.exists(os.path.join(stage_dir, marker)):
      os.remove(os.path.join(stage_dir, marker))


def plan(config, workdir: str, only=None, start=None, upstream=None):
  """(stages to run here, stages to redo): checks the arguments, changes nothing."""
  if only and start:
    raise ValueError("give --only or --from, not both")
  if upstream:
    if not (only or start):
      raise ValueError("--upstream needs --from or --only: which stages run here")
    if os.path.abspath(upstream) == os.path.abspath(workdir):
      raise ValueError("--upstream must be another workdir than --workdir")
    if not os.path.isdir(upstream):
      raise FileNotFoundError(f"upstream workdir {upstream} does not exist")
  skip = parse_stages(config.skip, "config.skip")
  bad = [s for s in skip if s not in OPTIONAL]
  if bad:
    raise ValueError(f"config.skip: only {', '.join(OPTIONAL)} can be skipped, not {bad}")
  parse_langs(config.langs)
  redo: list[str] = []
  if only:
    redo = parse_stages(only, "--only")
  elif start:
    first = parse_stages(start, "--from")
    if len(first) != 1:
      raise ValueError(f"--from takes one stage, got {start!r}")
    redo = list(STAGES[STAGES.index(first[0]):])
  replaced = replaced_by_model(config)
  if only and set(redo) & set(replaced):
    log.warning("--only: %s come from the pretrained model %s: nothing to redo there",
                ", ".join(s for s in redo if s in replaced), config.model)
  redo = [s for s in redo if s not in replaced]
  if only or upstream:
    local = [s for s in STAGES if s in redo or s == "report"]
  else:
    local = [s for s in STAGES if s not in replaced]
  return [s for s in local if s not in skip], [s for s in redo if s != "report"], skip


def run_pipeline(config, workdir: str, *, only=None, start=None, upstream=None) -> dict:
  """Runs the stages in order; returns {stage: summary} (also written to W/summary.json).

  only: stages to redo, alone (a list or 'a,b'); start: redo this stage and all after it;
  upstream: a finished pipeline workdir whose stages are used for those not run here.
  A trainer that stops part-way ends the run early (no DONE.json, no report): the same call
  resumes it.
  """
  local, redo, skip = plan(config, workdir, only, start, upstream)
  validate.validate_or_raise(config, stages=local)  # every stage it runs, before the first
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()  # the stages' own bars say more
  os.makedirs(workdir, exist_ok=True)
  for stage in redo:
    # A finished stage, or one started with another config, is deleted; one interrupted with
    # this same config resumes (re-running an interrupted --only/--from command continues it).
    stage_dir = os.path.join(workdir, stage)
    started = read_marker(stage_dir, STARTED) or {}
    if read_done(stage_dir) or started.get("config_hash") != config_hash(config, stage):
      clear_stage(stage_dir, stage)
  replaced = replaced_by_model(config)
  ctx = Context(config=config, workdir=workdir, upstream=upstream,
                local=frozenset(local) | frozenset(redo), skipped=frozenset(skip),
                replaced=frozenset(replaced))
  summary: dict = {}
  for stage in STAGES:
    if stage in skip:
      summary[stage] = {"status": "skipped by config.skip"}
      continue
    if stage in replaced:
      summary[stage] = model_stage_summary(config, stage)
      continue
    if stage not in local:
      directory = ctx.stage_dir(stage)
      here = directory == os.path.join(workdir, stage)
      summary[stage] = {**(read_done(directory) or {}), "dir": directory,
                        "status": "not run" if here else "upstream"}
      continue
    if stage == "report":
      _write_summary(config, workdir, summary, upstream)  # the report reads it
    try:
      summary[stage] = _run_one(ctx, stage)
    except StageStopped as e:
      summary[stage] = {"status": "stopped", "dir": os.path.join(workdir, stage),
                        "message": str(e)}
      _say(str(e))
      break
  _write_summary(config, workdir, summary, upstream)
  return summary


def model_stage_summary(config, stage: str) -> dict:
  """The summary of a stage the pretrained model stands in for: what it takes instead."""
  what = ("its own tokenizer and chat template" if stage == "tokenizer"
          else "its weights, as pretrained (config.continue_pretraining=False)")
  return {"status": "from the pretrained model", "dir": None, "line": f"{config.model}: {what}"}


def _write_summary(config, workdir, summary, upstream) -> None:
  write_json_atomic(os.path.join(workdir, SUMMARY), {
      "workdir": os.path.abspath(workdir), "upstream": upstream and os.path.abspath(upstream),
      "stages": summary, "config": config.to_dict(), "machine": machine_info()})


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv):
  del argv
  flags_ = flags.FLAGS
  if not flags_.workdir:
    raise app.UsageError("--workdir is required")
  setup_logging()
  try:
    run_pipeline(_CONFIG.value, flags_.workdir, only=flags_.only or None,
                 start=flags_["from"].value or None, upstream=flags_.upstream or None)
  except (MissingStageError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module (sweeps, notebooks,
  # tests) never clashes with another entry point's --config / --workdir.
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file(
      "config", "configs/pipeline.py", "configs/pipeline.py[:args]", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where every stage writes (W/<stage>/).")
  flags.DEFINE_string("only", "", "Redo only these stages, comma-separated.")
  flags.DEFINE_string("from", "", "Redo this stage and every later one.")
  flags.DEFINE_string("upstream", "", "A finished pipeline workdir to take the stages not run "
                                      "here from (needs --from or --only).")
  app.run(main, flags_parser=overrides.flags_parser("config", "configs/pipeline.py"))
