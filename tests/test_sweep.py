"""Sweeps from config files (rlhf_jax/recipe/sweep/): building runs, naming them, checking their
overrides, reading metrics, running them through the pipeline, and the printed commands."""
import ast
import csv
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.recipe import sweep as sweep_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
PIPELINE_CONFIG = f"{REPO}/configs/pipeline.py:size=tiny,smoke=1"

# A three-run sweep over beta. The fake pipeline below fails the 0.2 run on purpose.
SWEEP_FILE = f'''
from rlhf_jax.recipe.sweep import product
BASE = "{PIPELINE_CONFIG}"
START = "ppo"
METRICS = {{
    "kl": "ppo:objective/kl",
    "gold": "results:metrics.ppo.*.gold",
    "gold_en": "results:metrics.ppo.en.gold",
    "done_kl": "ppo/DONE.json:metrics.objective/kl",
}}
PLOT = ("kl", "gold")

def get_sweep():
  return product({{"ppo.kl.coef": [0.01, 0.2, 0.5]}})
'''


def write_sweep(tmp_path, text=SWEEP_FILE, name="sweep.py"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


# ----------------------------------------------------------------------------- building runs

def test_product_and_zipped_against_hand_written_lists():
  assert sweep_lib.product({"a.x": [1, 2], "b": ["p", "q"]}) == [
      {"a.x": 1, "b": "p"}, {"a.x": 1, "b": "q"}, {"a.x": 2, "b": "p"}, {"a.x": 2, "b": "q"}]
  # keyword form: "__" stands for "."; axes keep their order
  assert sweep_lib.product(ppo__kl__coef=[0.0, 0.1], seed=[3]) == [
      {"ppo.kl.coef": 0.0, "seed": 3}, {"ppo.kl.coef": 0.1, "seed": 3}]
  assert sweep_lib.zipped({"a": [1, 2, 3], "b.c": [True, False, True]}) == [
      {"a": 1, "b.c": True}, {"a": 2, "b.c": False}, {"a": 3, "b.c": True}]
  with pytest.raises(ValueError, match="equal lengths"):
    sweep_lib.zipped({"a": [1, 2], "b": [1]})
  with pytest.raises(TypeError, match="list of values"):
    sweep_lib.product({"a": "abc"})  # a string is not a list of values


def test_run_names_are_readable_safe_and_unique():
  names = sweep_lib.run_names([{"ppo.kl.coef": 0.0, "ppo.kl.adaptive": False},
                               {"ppo.kl.coef": 0.05, "ppo.kl.adaptive": True}])
  assert names == ["coef=0+adaptive=false", "coef=0.05+adaptive=true"]
  # two keys ending alike keep the part that tells them apart
  assert sweep_lib.run_names([{"ppo.kl.coef": 1.0}, {"ppo.ptx.coef": 0.5}]) == [
      "kl.coef=1", "ptx.coef=0.5"]
  # characters a path or a shell word would choke on become "-"; clashes are numbered
  assert sweep_lib.run_names([{"a.b": "x y"}, {"a.b": "x/y"}, {}]) == [
      "b=x-y", "b=x-y-2", "default"]
  assert sweep_lib.run_names([{"_name": "mine", "a": 1}, {"a": 1}]) == ["mine", "a=1"]


# ----------------------------------------------------------------------------- overrides

def _small_config():
  import ml_collections
  config = ml_collections.ConfigDict({"ppo": {"kl": {"coef": 0.05, "adaptive": True}},
                                      "rm": {"loss": {"name": "kwise"}}, "seed": 0})
  config.lock()
  return config


def test_apply_overrides_sets_fields_and_names_unknown_keys():
  config = _small_config()
  out = sweep_lib.apply_overrides(config, {"ppo.kl.coef": 0.2, "rm.loss.name": "pairwise"})
  assert (out.ppo.kl.coef, out.rm.loss.name) == (0.2, "pairwise")
  assert config.ppo.kl.coef == 0.05  # the original is untouched
  with pytest.raises(ValueError, match=r"'ppo\.kl\.coeff'.*did you mean 'ppo\.kl\.coef'"):
    sweep_lib.apply_overrides(config, {"ppo.kl.coeff": 0.1})
  with pytest.raises(ValueError, match=r"'pp\.kl\.coef'.*did you mean 'ppo\.kl\.coef'"):
    sweep_lib.apply_overrides(config, {"pp.kl.coef": 0.1})
  with pytest.raises(ValueError, match="is a config section"):
    sweep_lib.apply_overrides(config, {"ppo.kl": 0.1})
  with pytest.raises(ValueError, match=r"cannot set ppo\.kl\.adaptive='yes'"):
    sweep_lib.apply_overrides(config, {"ppo.kl.adaptive": "yes"})


def test_bad_sweeps_fail_before_anything_runs(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr("rlhf_jax.recipe.pipeline.run_pipeline", lambda *a, **k: calls.append(a))
  bad_key = write_sweep(tmp_path, SWEEP_FILE.replace('"ppo.kl.coef"', '"ppo.kl.coeff"'), "a.py")
  with pytest.raises(ValueError, match=r"run 0 .*'ppo\.kl\.coeff'.*'ppo\.kl\.coef'"):
    sweep_lib.run_sweep(bad_key, str(tmp_path / "w"))
  # a stage before START is shared by every run: changing it per run would do nothing
  shared = write_sweep(tmp_path, SWEEP_FILE.replace('"ppo.kl.coef"', '"sft.optim.learning_rate"'),
                       "b.py")
  with pytest.raises(ValueError, match=r"changes stage 'sft'.*START='ppo'"):
    sweep_lib.run_sweep(shared, str(tmp_path / "w"))
  bad_metric = write_sweep(tmp_path, SWEEP_FILE.replace('"ppo:objective/kl"', '"pop:kl"'), "c.py")
  with pytest.raises(ValueError, match=r"unknown source 'pop'.*did you mean 'ppo'"):
    sweep_lib.run_sweep(bad_metric, str(tmp_path / "w"))
  with pytest.raises(ValueError, match=r"--set.*'ppo\.kl\.coeff'"):
    sweep_lib.run_sweep(write_sweep(tmp_path), str(tmp_path / "w"), sets=["ppo.kl.coeff=1"])
  assert calls == [] and not (tmp_path / "w").exists()


def test_a_sweep_files_set_reaches_every_run_and_a_flag_beats_it(tmp_path):
  """SET in the sweep file is --set written down once: the base config of every run carries it,
  the printed commands pass it, a --set of the same key wins, and a bad key names the file."""
  text = SWEEP_FILE.replace('START = "ppo"', 'START = "ppo"\nSET = {"skip": "kto,dpo", '
                            '"evaluate.prompts_per_lang": 5}')
  path = write_sweep(tmp_path, text)
  sweep, config, sets = sweep_lib.prepare(path, sets=["evaluate.prompts_per_lang=7"])
  assert sets == {"skip": "kto,dpo", "evaluate.prompts_per_lang": 7}
  assert config.skip == "kto,dpo" and config.evaluate.prompts_per_lang == 7
  commands = sweep_lib.commands(sweep, "W", sets=sets)
  runs = [c for c in commands if not c.startswith("#")]
  assert len(runs) == 3 and all("--config.skip=kto,dpo" in c and
                                "--config.evaluate.prompts_per_lang=7" in c for c in runs)
  bad = write_sweep(tmp_path, text.replace('"skip"', '"skipp"'), "bad.py")
  with pytest.raises(ValueError, match=re.escape(f"{bad}: SET: ") + ".*'skipp'"):
    sweep_lib.prepare(bad)



def test_shipped_sweeps_check_against_the_pipeline_config():
  """Every experiments/*/sweep.py loads and its overrides name real pipeline-config fields."""
  files = sorted((REPO / "experiments").glob("*/sweep.py"))
  assert {f.parent.name for f in files} >= {"kl_sweep", "rm_loss_ablation", "ptx_ablation"}
  for path in files:
    sweep, config, _ = sweep_lib.prepare(str(path), PIPELINE_CONFIG)
    assert sweep.runs and sweep.metrics and sweep.plot
    for run in sweep.runs:
      applied = sweep_lib.apply_overrides(config, run.overrides)
      for key, value in run.overrides.items():
        node = applied
        for part in key.split("."):
          node = node[part]
        assert node == value, (path, key)


# ----------------------------------------------------------------------------- metrics

def test_resolve_metric_reads_last_values_json_paths_and_means(tmp_path):
  run = tmp_path / "run"
  (run / "ppo").mkdir(parents=True)
  (run / "evaluate").mkdir()
  rows = [{"step": 1, "objective/kl": 1.5, "eval/en/gold": 0.1},
          {"step": 2, "objective/kl": 2.5},
          {"step": 3, "objective/kl": 3.5, "eval/en/gold": 0.3, "eval/zh/gold": 0.7,
           "eval/en/gold_sft": 9.0, "bad": "nan"}]
  (run / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (run / "evaluate" / "results.json").write_text(json.dumps(
      {"metrics": {"ppo": {"en": {"gold": 0.25}, "zh": {"gold": -0.75}}}, "langs": ["en", "zh"],
       "policies": ["sft", "ppo"]}))
  (run / "summary.json").write_text(json.dumps({"stages": {"rm": {"seconds": 4}}}))
  get = lambda spec: sweep_lib.resolve_metric(str(run), spec)  # noqa: E731
  assert get("ppo:objective/kl") == 3.5  # the last value logged
  assert get("ppo:eval/en/gold") == 0.3
  # "*" averages every full match: eval/en/gold_sft is not one
  assert get("ppo:eval/*/gold") == pytest.approx(np.mean([0.3, 0.7]))
  assert get("results:metrics.ppo.*.gold") == pytest.approx(np.mean([0.25, -0.75]))
  assert get("results:policies.1") == "ppo"  # list items by index
  assert get("summary:stages.rm.seconds") == 4
  assert get("ppo/metrics.jsonl:step") == 3  # a path as the source
  assert np.isnan(get("ppo:bad*"))  # non-finite values come back from their JSON string
  assert get("ppo:objective/kll") is None  # missing: None (and a warning)
  assert get("kto:train/loss") is None  # no such file


# ----------------------------------------------------------------------------- running

def _fake_pipeline(calls):
  """Stands in for rlhf_jax.recipe.pipeline.run_pipeline: writes the files a finished run has, with
  numbers derived from beta, and raises for beta = 0.2."""
  from rlhf_jax.recipe import pipeline

  def run_pipeline(config, workdir, *, only=None, start=None, upstream=None):
    calls.append((workdir, only, start, upstream))
    stages = list(only) if only else list(pipeline.STAGES[pipeline.STAGES.index(start):])
    beta = float(config.ppo.kl.coef)
    if beta == 0.2:
      raise RuntimeError("beta 0.2 diverged")
    os.makedirs(workdir, exist_ok=True)
    for stage in stages:
      os.makedirs(os.path.join(workdir, stage), exist_ok=True)
      done = {"config_hash": pipeline.config_hash(config, stage), "metrics": {}}
      if stage == "ppo":
        done["metrics"] = {"objective/kl": 10.0 * beta + 1 / 3}
        with open(os.path.join(workdir, "ppo", "metrics.jsonl"), "w") as f:
          f.write(json.dumps({"step": 1, "objective/kl": 99.0}) + "\n")
          f.write(json.dumps({"step": 2, "objective/kl": 10.0 * beta + 1 / 7}) + "\n")
      if stage == "evaluate":
        with open(os.path.join(workdir, "evaluate", "results.json"), "w") as f:
          json.dump({"metrics": {"ppo": {"en": {"gold": 1.0 - beta / 7},
                                         "zh": {"gold": 0.5 + beta / 3}},
                                 "sft": {"en": {"gold": 7.0}}}}, f)
      if stage != "report":
        with open(os.path.join(workdir, stage, "DONE.json"), "w") as f:
          json.dump(done, f)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({"stages": {s: {"status": "ran" if s in stages else "upstream"}
                            for s in pipeline.STAGES}}, f)
  return run_pipeline


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_sweep_runs_in_sequence_records_failures_and_skips_finished_runs(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr("rlhf_jax.recipe.pipeline.run_pipeline", _fake_pipeline(calls))
  workdir = tmp_path / "w"
  rows = sweep_lib.run_sweep(write_sweep(tmp_path), str(workdir))

  base = str(workdir / "base")
  assert calls[0] == (base, ["tokenizer", "pretrain", "sft", "comparisons", "rm"], None, None)
  assert [c[0] for c in calls[1:]] == [str(workdir / "runs" / n)
                                       for n in ("coef=0.01", "coef=0.2", "coef=0.5")]
  assert all(c[2:] == ("ppo", base) for c in calls[1:])

  # One row per run; each metric equals what that run's own files say.
  table = _read_csv(workdir / "results.csv")
  assert [r["run"] for r in table] == ["coef=0.01", "coef=0.2", "coef=0.5"]
  assert [r["status"] for r in table] == ["done", "failed", "done"]
  assert "beta 0.2 diverged" in table[1]["error"] and table[1]["kl"] == ""
  for row, csv_row in zip(rows, table):
    if row["status"] != "done":
      continue
    run = workdir / "runs" / row["run"]
    last = [json.loads(l) for l in (run / "ppo" / "metrics.jsonl").read_text().splitlines()][-1]
    results = json.loads((run / "evaluate" / "results.json").read_text())["metrics"]["ppo"]
    done = json.loads((run / "ppo" / "DONE.json").read_text())
    expected = {"kl": last["objective/kl"],
                "gold": np.mean([results["en"]["gold"], results["zh"]["gold"]]),
                "gold_en": results["en"]["gold"], "done_kl": done["metrics"]["objective/kl"]}
    for label, value in expected.items():
      assert float(csv_row[label]) == pytest.approx(value, rel=1e-12), label
      assert row[label] == pytest.approx(value, rel=1e-12), label
    assert float(csv_row["ppo.kl.coef"]) == float(row["run"].split("=")[1])
  saved = json.loads((workdir / "results.json").read_text())
  assert [r["status"] for r in saved["runs"]] == ["done", "failed", "done"]
  assert saved["runs"][2]["gold"] == pytest.approx(np.mean([1.0 - 0.5 / 7, 0.5 + 0.5 / 3]))
  md = (workdir / "results.md").read_text().splitlines()
  table_rows = [l for l in md if l.startswith("| coef=")]
  assert len(table_rows) == 3 and "| failed |" in table_rows[1]
  assert (workdir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "beta 0.2 diverged" in (workdir / "runs" / "coef=0.2" / "FAILED.txt").read_text()

  # Again: the base and the finished runs are skipped, the failed one is tried again.
  calls.clear()
  sweep_lib.run_sweep(write_sweep(tmp_path), str(workdir))
  assert [c[0] for c in calls] == [str(workdir / "runs" / "coef=0.2")]

  # --collect runs nothing and tabulates the same rows.
  calls.clear()
  again = sweep_lib.run_sweep(write_sweep(tmp_path), str(workdir), collect_only=True)
  assert calls == [] and [r["status"] for r in again] == ["done", "failed", "done"]


def test_base_workdir_and_run_selection(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr("rlhf_jax.recipe.pipeline.run_pipeline", _fake_pipeline(calls))
  path = write_sweep(tmp_path)
  # --base must have finished the shared stages
  with pytest.raises(ValueError, match=r"has not finished the stages \['tokenizer'"):
    sweep_lib.run_sweep(path, str(tmp_path / "w"), base=str(tmp_path))
  base = tmp_path / "b"
  for stage in ("tokenizer", "pretrain", "sft", "comparisons", "rm"):
    (base / stage).mkdir(parents=True)
    (base / stage / "DONE.json").write_text("{}")
  with pytest.raises(ValueError, match=r"no run 'coef=0.05'.*did you mean"):
    sweep_lib.run_sweep(path, str(tmp_path / "w"), base=str(base), runs=["coef=0.05"])
  rows = sweep_lib.run_sweep(path, str(tmp_path / "w"), base=str(base), runs=["coef=0.5"])
  assert calls == [(str(tmp_path / "w" / "runs" / "coef=0.5"), None, "ppo", str(base))]
  assert [r["status"] for r in rows] == ["pending", "pending", "done"]



def _pipeline_warned(caplog, pipeline, config, workdir, tmp_path, stages):
  """The stages among `stages` that the pipeline itself, run again on a copy of `workdir`,
  skips with a warning that they are stale (its own check, made before it skips a stage)."""
  copy_dir = tmp_path / f"check{len(list(tmp_path.glob('check*')))}"
  shutil.copytree(workdir, copy_dir)  # copy2 keeps the DONE.json times the pipeline compares
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="rlhf_jax.recipe.pipeline"):
    pipeline.run_pipeline(config, str(copy_dir))
  warned = {m.group(1) for r in caplog.records
            for m in [re.match(r"\[(\w+)\] was finished (with a different config|before)",
                               r.getMessage())] if m}
  return [s for s in stages if s in warned]


def test_shared_stages_are_stale_exactly_when_the_pipeline_says_so(tmp_path, monkeypatch,
                                                                   caplog):
  """The sweep reuses W/base only where the real pipeline driver, run again there, would skip
  every shared stage without a warning; each change below makes both name the same stages."""
  from rlhf_jax.recipe import pipeline
  for stage in pipeline.STAGES:  # every stage finishes at once, writing only its markers
    monkeypatch.setitem(pipeline.STAGE_FNS, stage, lambda ctx: ({}, "fake"))
  path, workdir = write_sweep(tmp_path), str(tmp_path / "w")
  base = os.path.join(workdir, "base")
  shared = ["tokenizer", "pretrain", "sft", "comparisons", "rm"]  # the stages before START=ppo

  def sweep_stale(sets):
    sweep, config, _ = sweep_lib.prepare(path, sets=sets)
    try:
      assert sweep_lib.prepare_base(sweep, config, workdir, None) == base
    except ValueError as e:
      return ast.literal_eval(re.search(r"stages (\[[^\]]*\]) are stale", str(e)).group(1)), config
    return [], config

  assert sweep_stale([])[0] == [] and os.path.exists(os.path.join(base, "rm", "DONE.json"))
  # By hand: a stage's hash covers its own section and the shared fields (size, langs,
  # data_dir, seed), so the SFT learning rate makes SFT alone stale, a PPO field (after START)
  # none of the shared stages, and the seed all of them.
  for sets, expected in ((["sft.optim.learning_rate=0.123"], ["sft"]),
                         (["ppo.kl.coef=0.3"], []),
                         (["seed=5"], shared),
                         ([], [])):
    stale, config = sweep_stale(sets)
    assert stale == expected, sets
    assert _pipeline_warned(caplog, pipeline, config, base, tmp_path, shared) == expected, sets
    assert [s for s in shared
            if pipeline.stage_status(config, base, s) == "stale"] == expected, sets
  # The tokenizer redone later: the stages that read it (pretrain, SFT) finished before it.
  pipeline.run_pipeline(config, base, only=["tokenizer"])
  stale, config = sweep_stale([])
  assert stale == ["pretrain", "sft"]
  assert _pipeline_warned(caplog, pipeline, config, base, tmp_path, shared) == stale


# ----------------------------------------------------------------------------- commands

def test_print_commands_parse_back_to_the_same_overrides(tmp_path):
  """The printed commands, read by the pipeline's own config flag, give each run's config."""
  from absl import flags
  from ml_collections import config_flags
  path = write_sweep(tmp_path)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.recipe.sweep", path, "--workdir=W", "--print_commands",
       "--set=ppo.train.steps=3"], capture_output=True, text=True, cwd=REPO, env=env, check=True)
  lines = out.stdout.strip().splitlines()
  commands = [l for l in lines if not l.startswith("#")]
  assert len(commands) == 3
  assert lines[0].startswith("# first")  # the shared stages, once, before the runs
  assert "--only=tokenizer,pretrain,sft,comparisons,rm" in lines[0]
  assert "--collect" in lines[-1] and "--set=ppo.train.steps=3" in lines[-1]
  for beta, name, command in zip((0.01, 0.2, 0.5), ("coef=0.01", "coef=0.2", "coef=0.5"),
                                 commands):
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "rlhf_jax.recipe.pipeline"]
    assert {"--workdir=W/runs/" + name, "--from=ppo", "--upstream=W/base"} <= set(argv)
    config_args = ["prog"] + [a for a in argv[3:] if a.startswith("--config")]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                    sys_argv=config_args)
    values(config_args)
    assert values.config.ppo.kl.coef == beta
    assert values.config.ppo.train.steps == 3
    assert values.config.ppo.kl.adaptive is True  # untouched fields keep the base's value


# ----------------------------------------------------------------------------- end to end

E2E_SWEEP = f'''
from rlhf_jax.recipe.sweep import product
BASE = "{PIPELINE_CONFIG}"
START = "ppo"
METRICS = {{
    "beta": "ppo:objective/kl_coef",
    "kl": "ppo:eval/*/kl",
    "gold": "results:metrics.ppo.*.gold",
    "win_en": "summary:stages.evaluate.metrics.ppo/en/win_rate",
}}
PLOT = ("kl", "gold")

def get_sweep():
  return product({{"ppo.kl.coef": [0.0, 0.2], "ppo.kl.adaptive": [False]}})
'''


@pytest.mark.slow
@pytest.mark.heavy
def test_tiny_sweep_on_the_real_pipeline(tmp_path, tiny_pipeline_workdir, bundled_data_dir,
                                         bundled_tokenizer):
  """Two PPO runs (2 iterations each, as the smoke preset has) on the shared tiny pipeline: one
  row per run, each value what that run's own files say."""
  workdir = tmp_path / "w"
  rows = sweep_lib.run_sweep(
      write_sweep(tmp_path, E2E_SWEEP), str(workdir), base=tiny_pipeline_workdir,
      sets=[f"data_dir={bundled_data_dir}", f"tokenizer.path={bundled_tokenizer}",
            "skip=kto,dpo"])  # the runs need only PPO and its evaluation
  names = ["coef=0+adaptive=false", "coef=0.2+adaptive=false"]
  table = _read_csv(workdir / "results.csv")
  assert [r["run"] for r in table] == names
  assert [r["status"] for r in table] == ["done", "done"], [r["error"] for r in table]
  for name, beta, row, csv_row in zip(names, (0.0, 0.2), rows, table):
    run = workdir / "runs" / name
    assert not (run / "sft").exists()  # shared stages were read from the base, not redone
    records = [json.loads(l) for l in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    last = {}
    for record in records:
      last.update(record)
    results = json.loads((run / "evaluate" / "results.json").read_text())["metrics"]["ppo"]
    summary = json.loads((run / "summary.json").read_text())
    expected = {
        "beta": last["objective/kl_coef"],
        "kl": np.mean([last["eval/en/kl"], last["eval/zh/kl"]]),
        "gold": np.mean([results["en"]["gold"], results["zh"]["gold"]]),
        "win_en": summary["stages"]["evaluate"]["metrics"]["ppo/en/win_rate"]}
    assert expected["beta"] == pytest.approx(beta)  # the override reached the run
    assert expected["win_en"] == results["en"]["win_rate"]
    for label, value in expected.items():
      assert float(csv_row[label]) == pytest.approx(value, rel=1e-12, abs=1e-12), label
      assert row[label] == pytest.approx(value, rel=1e-12, abs=1e-12), label
  md_rows = [l for l in (workdir / "results.md").read_text().splitlines()
             if l.startswith("| coef=")]
  assert [l.split(" | ")[0] for l in md_rows] == ["| " + n for n in names]
  assert (workdir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
