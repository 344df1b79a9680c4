"""The pipeline's bookkeeping on disk: stage names, markers (STARTED.json, DONE.json), the
config hash a stage ran with, and whether a finished stage is still current.

A stage writes `W/<stage>/STARTED.json` (its config hash) when it starts and `DONE.json`
(seconds, key metrics, config hash) last and atomically when it finishes, so a finished stage
is skipped on the next run and an interrupted one resumes. Sweeps read the same status
(`stage_status`) to decide whether a shared base can be reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

from rlhf_jax.core.langs import LANGS

STAGES = ("tokenizer", "pretrain", "sft", "comparisons", "rm", "ppo", "kto", "dpo",
          "evaluate", "report")
TRAINED = ("pretrain", "sft", "rm", "ppo", "kto", "dpo")  # run by a trainer (resumable)
OPTIONAL = ("ppo", "kto", "dpo")  # stages `config.skip` may leave out
POLICIES = ("sft", "ppo", "kto", "dpo")  # compared by the evaluate stage, SFT the baseline
# Whose outputs each stage reads: a stage finished before one of these was redone is stale.
DEPENDS = {"pretrain": ("tokenizer",), "sft": ("tokenizer", "pretrain"), "comparisons": ("sft",),
           "rm": ("sft", "comparisons"), "ppo": ("sft", "rm"), "kto": ("sft",),
           "dpo": ("sft", "comparisons"), "evaluate": ("sft", "ppo", "kto", "dpo")}
DONE = "DONE.json"
STARTED = "STARTED.json"  # the config hash a stage was started with (to resume, or not)
SUMMARY = "summary.json"
# Stages an imported pretrained model (configs/pipeline.py:model=...) stands in for: its own
# tokenizer, and its weights as the pretraining run (unless config.continue_pretraining).
MODEL_STAGES = ("tokenizer", "pretrain")
# Model fields a stage keeps its own (models.transformer.NUMERICS_FIELDS); every other model
# field comes from config.pretrain.model.


class StageStopped(RuntimeError):
  """A trainer returned before its last step (preempted, or train.stop_after): resumable."""


class MissingStageError(RuntimeError):
  """A stage needs the output of one that has not finished where the pipeline looks for it."""


# ---------------------------------------------------------------------------------------------
# Small helpers.


def write_json_atomic(path: str, obj) -> None:
  """Writes a temporary file next to `path` and renames it: readers see all of it or none."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, ensure_ascii=False, sort_keys=False)
  os.replace(tmp, path)


class MarkerError(ValueError):
  """A stage marker (DONE.json, STARTED.json) that is not what the pipeline wrote."""


def read_marker(stage_dir: str, name: str = DONE) -> dict | None:
  """A stage's marker, None when absent; `path: what is wrong` when it is not a JSON object
  (an interrupted copy, an edit by hand): delete it to run the stage again."""
  path = os.path.join(stage_dir, name)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      marker = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise MarkerError(f"{path}: not valid JSON ({e}); delete it to run the stage again") from None
  if not isinstance(marker, dict):
    raise MarkerError(f"{path}: expected a JSON object, got {type(marker).__name__}; delete it "
                      "to run the stage again")
  return marker


def read_done(stage_dir: str) -> dict | None:
  """The stage's DONE.json, or None while it has not finished."""
  return read_marker(stage_dir, DONE)


def parse_langs(langs: str) -> tuple[str, ...]:
  out = tuple(l.strip() for l in str(langs).split(",") if l.strip())
  bad = [l for l in out if l not in LANGS]
  if not out or bad or len(set(out)) != len(out):
    raise ValueError(f"config.langs={langs!r}: give 'en,zh', 'en' or 'zh'")
  return out


def parse_stages(value, what: str) -> list[str]:
  """'rm,ppo' or a sequence -> stage names, checked against STAGES."""
  names = value.split(",") if isinstance(value, str) else list(value)
  names = [n.strip() for n in names if n.strip()]
  bad = [n for n in names if n not in STAGES]
  if bad:
    raise ValueError(f"{what}: unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
  return names


def config_hash(config, stage: str) -> str:
  """A short hash of what determines a stage's output: its section and the shared fields,
  less train.stop_after (where to pause changes nothing). The section never holds the paths
  between stages: those go into a copy (Context.stage_config)."""
  section = config[stage].to_dict() if stage in config else {}
  section.get("train", {}).pop("stop_after", None)
  shared = {k: config[k] for k in ("size", "langs", "data_dir", "seed")}
  if config.get("model"):  # only when set: a from-scratch run's hashes stay what they were
    shared["model"] = config.model
  blob = json.dumps({"stage": stage, "section": section, "shared": shared}, sort_keys=True,
                    default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def replaced_by_model(config) -> tuple[str, ...]:
  """The stages a pretrained model replaces (none without `config.model`): its tokenizer is
  the model's own, and its weights are the pretraining run unless it is continued."""
  if not config.get("model"):
    return ()
  return MODEL_STAGES[:1] if config.get("continue_pretraining") else MODEL_STAGES


def stage_status(config, workdir: str, stage: str) -> str:
  """"missing" (no W/<stage>/DONE.json), "stale" or "done": what the driver weighs before it
  skips a finished stage, for callers that decide from outside (sweeps sharing one base).

  Stale: finished under another config hash, or before a stage it reads (DEPENDS, in the same
  workdir) was redone. The report has no DONE.json, so it is always "missing". A stage the
  pretrained model stands in for (replaced_by_model) is always "done".
  """
  if stage in replaced_by_model(config):
    return "done"
  stage_dir = os.path.join(workdir, stage)
  done = read_done(stage_dir)
  if done is None:
    return "missing"
  newer = [d for d in DEPENDS.get(stage, ())
           if done_time(os.path.join(workdir, d)) > done_time(stage_dir)]
  if newer or done.get("config_hash") != config_hash(config, stage):
    return "stale"
  return "done"


def last_values(records: Sequence[dict]) -> dict:
  """{metric: its last logged value} over metrics.jsonl records."""
  out: dict = {}
  for r in records:
    out.update({k: v for k, v in r.items() if k not in ("step", "time")})
  return out


def fmt(value, digits: int = 2) -> str:
  """A metric for a summary line; metrics.jsonl holds non-finite values as strings."""
  try:
    return f"{float(value):.{digits}f}"
  except (TypeError, ValueError):
    return "n/a"


def done_time(stage_dir: str) -> float:
  """When a stage's DONE.json was written (0 when it has not finished)."""
  path = os.path.join(stage_dir, DONE)
  return os.stat(path).st_mtime if os.path.exists(path) else 0.0
