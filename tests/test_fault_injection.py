"""Fault injection over the whole pipeline: the tiny smoke pipeline is SIGKILLed once in every
stage, at a seeded point, and the same command is run again until it finishes. Its final params,
data, results, metrics and summary must equal those of the uninterrupted run (the session's
tiny pipeline), bit for bit: a kill may cost time, never change a number.

Why kill points and not random delays: a delay lands wherever the machine's load puts it, so a
failure could not be replayed. Here the pipeline runs in a child process (this file run as a
script) whose writes are counted per stage -- checkpoint saves, metric records, JSON files
(markers, info, results, summary), the comparisons dataset, the answers of the evaluation, the
report -- and the child kills itself with SIGKILL just before or just after the k-th of them,
k drawn from a seeded generator. A stage with fewer writes than k is killed at its last one
(the DONE.json marker), so every stage is hit exactly once and the count of kills is bounded by
the number of stages.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from pipeline_fixture import tiny_pipeline_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20
MAX_EVENT = 6  # writes counted per stage: the smoke trainers make about 7 (2 steps)
# Fields of summary.json that describe the invocation, not the results: wall and CPU time,
# when, where, and whether this invocation ran the stage or found it done.
VOLATILE = ("seconds", "cpu_seconds", "finished", "status", "dir")


def kill_plan(seed: int = SEED) -> dict:
  """{stage: (k, 'before' | 'after')}: kill just before or after the stage's k-th write."""
  from rlhf_jax.recipe import pipeline
  rng = np.random.default_rng(seed)
  return {stage: (int(rng.integers(1, MAX_EVENT + 1)), str(rng.choice(["before", "after"])))
          for stage in pipeline.STAGES}


# ---------------------------------------------------------------------------------------------
# The child: the pipeline with counted writes (run as `python tests/test_fault_injection.py`).


class Killer:
  """Counts a stage's writes in this process and SIGKILLs it at the planned one. Kills already
  made (by earlier processes) are read from `log_path`, so each stage is killed only once."""

  def __init__(self, plan: dict, log_path: str):
    self.plan, self.log_path = plan, log_path
    self.spent = set()
    if os.path.exists(log_path):
      with open(log_path) as f:
        self.spent = {json.loads(line)["stage"] for line in f if line.strip()}
    self.counts: dict = {}
    self.stage = None

  def event(self, stage: str, what: str, last: bool, when: str) -> None:
    """The `when` ('before' / 'after') side of write `what` of `stage`; `last`: the stage's
    final write (its DONE.json, or the report's final summary.json)."""
    if stage in self.spent or stage not in self.plan:
      return
    k, side = self.plan[stage]
    if when == "before":
      self.counts[stage] = self.counts.get(stage, 0) + 1
    count = self.counts.get(stage, 0)
    if side != when or not (count == k or (last and count < k)):
      return
    with open(self.log_path, "a") as f:
      f.write(json.dumps({"stage": stage, "write": what, "count": count, "side": side}) + "\n")
      f.flush()
      os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

  def wrap(self, fn, what: str, stage_of=None, last_of=lambda *a: False):
    """`fn` with an event before and after each call; `stage_of(*args)` names the stage (by
    default the one running)."""
    def wrapped(*args, **kwargs):
      stage = stage_of(*args) if stage_of else self.stage
      last = last_of(*args)
      self.event(stage, what, last, "before")
      out = fn(*args, **kwargs)
      self.event(stage, what, last, "after")
      return out
    return wrapped


def install(killer: Killer) -> None:
  """Routes every counted write of the pipeline through `killer`."""
  from rlhf_jax.core import checkpoint, metrics
  from rlhf_jax.data import builders
  from rlhf_jax.eval import policies, report
  from rlhf_jax.recipe import comparisons, markers, pipeline, stages

  def json_stage(path, *rest):  # W/<stage>/X.json, or W/summary.json: the report's
    parent = os.path.basename(os.path.dirname(path))
    return parent if parent in pipeline.STAGES else "report"

  def json_last(path, *rest):
    name = os.path.basename(path)
    return name == pipeline.DONE or (name == pipeline.SUMMARY and killer.stage == "report")

  atomic = killer.wrap(markers.write_json_atomic, "json", json_stage, json_last)
  for module in (markers, stages, pipeline):
    module.write_json_atomic = atomic
  checkpoint.Checkpointer.save = killer.wrap(checkpoint.Checkpointer.save, "checkpoint")
  metrics.MetricWriter.write = killer.wrap(metrics.MetricWriter.write, "metrics")
  builders.write_comparisons = killer.wrap(builders.write_comparisons, "comparisons data")
  comparisons.sample_answers = killer.wrap(comparisons.sample_answers, "answers")
  policies.evaluate_policies = killer.wrap(policies.evaluate_policies, "evaluation")
  report.write_report = killer.wrap(report.write_report, "report")
  for stage, fn in list(stages.STAGE_FNS.items()):
    stages.STAGE_FNS[stage] = _entered(killer, stage, fn)


def _entered(killer: Killer, stage: str, fn):
  def run(ctx):
    killer.stage = stage
    return fn(ctx)
  return run


def child_main(workdir: str, plan_json: str, log_path: str, data_dir: str, tokenizer: str):
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
  from rlhf_jax.recipe import pipeline
  install(Killer({k: tuple(v) for k, v in json.loads(plan_json).items()}, log_path))
  pipeline.run_pipeline(tiny_pipeline_config(data_dir, tokenizer), workdir)


# ---------------------------------------------------------------------------------------------
# The test.


def run_until_finished(workdir: str, plan: dict, log_path: str, data_dir: str, tokenizer: str):
  """Runs the child again after each SIGKILL; returns the kills it made, in order."""
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  for _ in range(len(plan) + 2):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), workdir, json.dumps(plan),
                          log_path, data_dir, tokenizer], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode == 0:
      break
    assert out.returncode == -signal.SIGKILL, out.stderr[-4000:]
  else:
    pytest.fail(f"the pipeline did not finish after {len(plan) + 2} runs")
  with open(log_path) as f:
    return [json.loads(line) for line in f]


def relative(value, workdir: str):
  """`value` with the workdir's path in every string replaced by 'W'."""
  if isinstance(value, dict):
    return {k: relative(v, workdir) for k, v in value.items()}
  if isinstance(value, list):
    return [relative(v, workdir) for v in value]
  return value.replace(workdir, "W") if isinstance(value, str) else value


def summary_results(workdir: str) -> dict:
  """summary.json less what describes the invocation (VOLATILE, the machine, the workdir)."""
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  stages = {s: {k: v for k, v in record.items() if k not in VOLATILE}
            for s, record in summary["stages"].items()}
  return relative({"stages": stages, "config": summary["config"]}, os.path.abspath(workdir))


def timing(key: str) -> bool:
  """A metric of how fast, not of what: wall times and throughputs differ run to run."""
  return key == "time" or key.startswith("time/") or key.endswith("_per_s")


def metric_records(run: str) -> list[dict]:
  from rlhf_jax.core.metrics import read_metrics
  return [{k: v for k, v in r.items() if not timing(k)} for r in read_metrics(run)]


def json_file(path: str, workdir: str):
  with open(path, encoding="utf-8") as f:
    return relative(json.load(f), os.path.abspath(workdir))


def final_params(run: str) -> tuple[int, dict]:
  import jax
  from rlhf_jax.core import checkpoint, run_folder
  params = checkpoint.read_params(run_folder.checkpoint_dir(run))
  flat = {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  return run_folder.latest_step(run), flat


def comparisons_records(workdir: str) -> list:
  from rlhf_jax.data.rm_batches import read_records
  out = []
  for split in ("train", "validation", "test"):
    try:
      out += read_records("rlhf_comparisons/round0", split,
                          os.path.join(workdir, "comparisons", "tfds"))
    except ValueError:  # a split the hash left empty
      pass
  return relative(out, os.path.abspath(workdir))


def test_kill_plan_is_seeded_and_bounded():
  plan = kill_plan()
  assert plan == kill_plan(SEED) and plan != kill_plan(SEED + 1)
  assert all(1 <= k <= MAX_EVENT and side in ("before", "after") for k, side in plan.values())


@pytest.mark.slow
@pytest.mark.heavy  # ten restarts of the pipeline: ~4 minutes on top of the shared fixture
@pytest.mark.xdist_group("pipeline")
def test_sigkill_in_every_stage_then_resume_equals_the_uninterrupted_run(
    tiny_pipeline_workdir, tmp_path, bundled_data_dir, bundled_tokenizer):
  from rlhf_jax.recipe import pipeline
  reference, w = tiny_pipeline_workdir, str(tmp_path / "w")
  plan = kill_plan()
  kills = run_until_finished(w, plan, str(tmp_path / "kills.jsonl"), bundled_data_dir,
                             bundled_tokenizer)
  assert [k["stage"] for k in kills] == list(pipeline.STAGES), kills  # once in every stage

  assert summary_results(w) == summary_results(reference)
  for run in pipeline.TRAINED:
    step, params = final_params(os.path.join(w, run))
    ref_step, ref_params = final_params(os.path.join(reference, run))
    assert step == ref_step and params.keys() == ref_params.keys(), run
    for name, value in params.items():  # the same computation: bit for bit
      np.testing.assert_array_equal(value, ref_params[name], err_msg=f"{run} {name}")
    assert metric_records(os.path.join(w, run)) == metric_records(os.path.join(reference, run))
  for name in ("comparisons/info.json", "evaluate/results.json", "rm/normalization.json"):
    assert json_file(os.path.join(w, name), w) == json_file(os.path.join(reference, name),
                                                           reference), name
  assert comparisons_records(w) == comparisons_records(reference)
  samples = sorted(os.listdir(os.path.join(reference, "ppo", "samples")))
  assert sorted(os.listdir(os.path.join(w, "ppo", "samples"))) == samples
  for name in samples:
    with open(os.path.join(w, "ppo", "samples", name), encoding="utf-8") as f, \
        open(os.path.join(reference, "ppo", "samples", name), encoding="utf-8") as g:
      assert f.read() == g.read(), name
  assert os.path.exists(os.path.join(w, "report.md"))


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline")
def test_a_resumed_dpo_stage_summarises_as_the_uninterrupted_one(
    tiny_pipeline_workdir, tmp_path, bundled_data_dir, bundled_tokenizer):
  """DPO stopped after its first step, then resumed: the held-out accuracy before training
  (logged at step 0 by the first attempt) is in the summary, and metrics.jsonl holds each step
  once, as in the run that was never stopped."""
  from rlhf_jax.recipe import pipeline
  reference, w = tiny_pipeline_workdir, str(tmp_path / "w")
  stopped = tiny_pipeline_config(bundled_data_dir, bundled_tokenizer,
                                 **{"dpo.train.stop_after": 1})
  summary = pipeline.run_pipeline(stopped, w, only="dpo", upstream=reference)
  assert summary["dpo"]["status"] == "stopped"
  summary = pipeline.run_pipeline(stopped, w, only="dpo", upstream=reference)
  assert summary["dpo"]["status"] == "ran"
  done, ref_done = (pipeline.read_done(os.path.join(d, "dpo")) for d in (w, reference))
  assert done["metrics"]["eval/dpo/initial/accuracy"] is not None
  assert done["metrics"] == ref_done["metrics"] and done["line"] == ref_done["line"]
  steps = [r["step"] for r in metric_records(os.path.join(w, "dpo"))]
  assert steps == sorted(set(steps))  # no step twice
  assert metric_records(os.path.join(w, "dpo")) == metric_records(os.path.join(reference, "dpo"))
  assert summary_results(w)["stages"]["dpo"] == summary_results(reference)["stages"]["dpo"]


if __name__ == "__main__":
  child_main(*sys.argv[1:])
