"""The pipeline: its config is the stage configs, its plan of what runs where, the evaluation's
arithmetic, and the tiny pipeline end to end -- every stage, the report with its sections and
plots, a second run that skips everything, and an interrupted stage that resumes."""
import collections
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from pipeline_fixture import SMOKE_CONFIG, tiny_pipeline_config
from rlhf_jax.config import util as config_util
from rlhf_jax.eval import policies as evaluate, report
from rlhf_jax.recipe import comparisons, pipeline
from rlhf_jax.core.checkpoint import Checkpointer
from rlhf_jax.data import labelers
from rlhf_jax.core.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# The config.


def _with(section: dict, **fields) -> dict:
  """`section` with fields set, given as data__batch_size=32 for section['data']['batch_size']."""
  for key, value in fields.items():
    *path, name = key.split("__")
    d = section
    for part in path:
      d = d[part]
    d[name] = value
  return section


def test_stage_sections_are_the_stage_config_files():
  """Every field of a stage section is its config file's, except the few the demo tunes, which
  are listed here one by one (configs/pipeline.py says why for each)."""
  config = config_util.load_config("configs/pipeline.py:size=tiny")

  def stage(spec):
    return config_util.load_config(spec).to_dict()

  steps = {s: config[s].train.steps for s in ("pretrain", "sft", "ppo", "kto", "dpo")}
  assert config.pretrain.to_dict() == _with(
      stage(f"configs/pretrain.py:size=tiny,steps={steps['pretrain']}"), data__batch_size=32)
  assert config.sft.to_dict() == _with(
      stage(f"configs/sft.py:size=tiny,steps={steps['sft']}"), data__batch_size=32)
  rm = _with(stage(f"configs/reward.py:size=tiny,k={config.comparisons.k}"),
             normalize__source="responses",  # the comparisons' answers are SFT samples already
             optim__learning_rate=1e-3, optim__embed_lr_multiplier=20.0, optim__ema_decay=0.997,
             data__epochs=2,
             eval__max_comparisons=2 * config.comparisons.heldout_per_lang)
  assert config.rm.to_dict() == rm
  for name in ("kto", "dpo"):
    assert config[name].to_dict() == _with(
        stage(f"configs/{name}.py:size=tiny,steps={steps[name]}"), optim__learning_rate=3e-4)
  ppo = _with(stage(f"configs/ppo.py:size=tiny,lang=both,steps={steps['ppo']}"),
              eval__every=max(steps["ppo"] // 5, 1), data__batch_size=16,
              optim__learning_rate=3e-4, kl__target=3.0, kl__horizon=500.0)
  assert config.ppo.to_dict() == ppo
  small = config_util.load_config("configs/pipeline.py:size=small,ppo_steps=7")
  assert small.pretrain.model.d_model == 256 and small.ppo.train.steps == 7
  assert small.ppo.train.checkpoint_every == 1  # derived from the step count, as ppo.py does


def _parse_config_flags(argv):
  values = flags.FlagValues()
  # The override flags (--config.a.b) are made from the config the sys_argv names.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def test_command_line_overrides_reach_stage_sections():
  spec = f"--config={REPO}/configs/pipeline.py:size=tiny"
  config = _parse_config_flags(["prog", spec, "--config.ppo.kl.coef=0.123",
                                "--config.pretrain.train.steps=7", "--config.langs=zh"])
  assert config.ppo.kl.coef == 0.123
  assert config.pretrain.train.steps == 7
  assert config.langs == "zh"
  with pytest.raises((flags.Error, AttributeError), match="coef"):
    _parse_config_flags(["prog", spec, "--config.ppo.kl.coeff=1"])


def test_stage_config_fills_paths_and_shares_the_model_shape(tmp_path):
  config = config_util.load_config("configs/pipeline.py:size=tiny")
  with config.unlocked():
    config.pretrain.model.d_model = 96
    config.sft.model.dtype = "bfloat16"
    config.seed = 5
    config.data_dir = "/data/tfds"
  ctx = pipeline.Context(config=config, workdir=str(tmp_path), upstream=None,
                         local=frozenset(pipeline.STAGES))
  os.makedirs(tmp_path / "tokenizer")
  with open(tmp_path / "tokenizer" / pipeline.DONE, "w") as f:
    json.dump({}, f)
  sft = ctx.stage_config("sft")
  assert sft.model.d_model == 96 and sft.model.dtype == "bfloat16"  # shape shared, numerics own
  assert sft.tokenizer.path == str(tmp_path / "tokenizer" / "tokenizer.model")
  assert sft.seed == 5 + config.sft.seed and sft.data.data_dir == "/data/tfds"
  assert config.sft.tokenizer.path == "" and config.sft.model.d_model == 64  # not written back


# ---------------------------------------------------------------------------------------------
# What runs where.


@pytest.fixture
def tiny_config():
  return config_util.load_config("configs/pipeline.py:size=tiny,smoke=1")


def test_plan_of_only_from_and_upstream(tiny_config, tmp_path):
  w, w0 = str(tmp_path / "w"), str(tmp_path / "w0")
  os.makedirs(w0)
  assert pipeline.plan(tiny_config, w) == (list(pipeline.STAGES), [], [])
  assert pipeline.plan(tiny_config, w, only="rm,ppo") == (["rm", "ppo", "report"],
                                                          ["rm", "ppo"], [])
  redo = ["ppo", "kto", "dpo", "evaluate"]
  assert pipeline.plan(tiny_config, w, start="ppo") == (list(pipeline.STAGES), redo, [])
  assert pipeline.plan(tiny_config, w, start="ppo", upstream=w0) == (redo + ["report"], redo, [])
  with tiny_config.unlocked():
    tiny_config.skip = "kto"
  assert pipeline.plan(tiny_config, w, start="ppo", upstream=w0)[0] == [
      "ppo", "dpo", "evaluate", "report"]


@pytest.mark.parametrize("kwargs,fields,match", [
    ({"only": "rm", "start": "ppo"}, {}, "not both"),
    ({"upstream": "W0"}, {}, "needs --from or --only"),
    ({"only": "rn"}, {}, r"unknown stage\(s\) \['rn'\]"),
    ({"start": "ppo,kto"}, {}, "one stage"),
    ({}, {"skip": "rm"}, "only ppo, kto, dpo can be skipped"),
    ({}, {"langs": "en,fr"}, "config.langs"),
])
def test_bad_arguments_are_clear_errors(kwargs, fields, match, tiny_config, tmp_path):
  os.makedirs(tmp_path / "W0")
  kwargs = {k: (str(tmp_path / v) if k == "upstream" else v) for k, v in kwargs.items()}
  with tiny_config.unlocked():
    for k, v in fields.items():
      tiny_config[k] = v
  with pytest.raises(ValueError, match=match):
    pipeline.plan(tiny_config, str(tmp_path / "w"), **kwargs)


def test_upstream_without_the_needed_stage_names_it(tiny_config, tmp_path):
  upstream = tmp_path / "w0"
  os.makedirs(upstream / "tokenizer")
  with open(upstream / "tokenizer" / pipeline.DONE, "w") as f:
    json.dump({}, f)
  with pytest.raises(pipeline.MissingStageError, match=r"stage 'sft' has not finished in the "
                                                        r"upstream workdir .*w0"):
    pipeline.run_pipeline(tiny_config, str(tmp_path / "w"), start="comparisons",
                          upstream=str(upstream))
  assert not os.path.exists(tmp_path / "w" / "comparisons" / pipeline.DONE)


def test_a_stage_finished_here_earlier_wins_over_the_upstreams(tiny_config, tmp_path):
  """`--only=rm` then `--only=ppo` in one workdir with an upstream: PPO must read this
  workdir's new RM, not the upstream's old one."""
  upstream, here = tmp_path / "w0", tmp_path / "w"
  for stage_dir in (upstream / "rm", upstream / "sft", here / "rm"):
    os.makedirs(stage_dir)
    with open(stage_dir / pipeline.DONE, "w") as f:
      json.dump({}, f)
  os.makedirs(here / "sft")  # started here but never finished: the upstream's is used
  ctx = pipeline.Context(config=tiny_config, workdir=str(here), upstream=str(upstream),
                         local=frozenset({"ppo"}))
  assert ctx.require("rm") == str(here / "rm")
  assert ctx.require("sft") == str(upstream / "sft")
  assert ctx.stage_dir("ppo") == str(here / "ppo")


# ---------------------------------------------------------------------------------------------
# Evaluation arithmetic and the report of an empty run.


def test_compare_gold_and_win_rate_against_sft():
  def length(texts, lang):  # a stand-in gold scorer: longer is better
    return [len(t) for t in texts]

  prompts = {"en": ["p1", "p2", "p3"], "zh": ["q1", "q2"]}
  answers = {"sft": {"en": ["a", "bbb", "cc"], "zh": ["aa", "bb"]},
             "ppo": {"en": ["aa", "bbbb", "cc"], "zh": ["a", "bb"]}}
  out = evaluate.compare(answers, prompts, samples_per_lang=2, scorer=length)
  # en: ppo 2 > 1, 4 > 3, 2 == 2 -> (1 + 1 + 0.5) / 3; zh: 1 < 2, 2 == 2 -> (0 + 0.5) / 2.
  assert out["metrics"]["ppo"]["en"]["win_rate"] == pytest.approx(2.5 / 3)
  assert out["metrics"]["ppo"]["zh"]["win_rate"] == pytest.approx(0.25)
  assert out["metrics"]["sft"]["en"]["win_rate"] == 0.5
  assert out["metrics"]["ppo"]["en"]["gold"] == pytest.approx(8 / 3)
  assert out["samples"]["en"][1] == {"prompt": "p2", "answers": {"sft": "bbb", "ppo": "bbbb"},
                                     "gold": {"sft": 3.0, "ppo": 4.0}}
  assert len(out["samples"]["en"]) == 2
  with pytest.raises(ValueError, match="baseline"):
    evaluate.compare({"ppo": answers["ppo"]}, prompts)


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
  return struct.unpack(">II", head[16:24])


def test_report_of_a_run_with_nothing_done_says_so(tmp_path):
  path = report.write_report(str(tmp_path))
  text = open(path, encoding="utf-8").read()
  for section in report.SECTIONS:
    assert f"## {section}" in text
  assert "has not run yet" in text
  for name in report.PLOTS:
    assert min(_png_size(tmp_path / "plots" / name)) > 50


# ---------------------------------------------------------------------------------------------
# The tiny pipeline, end to end.


def _table_rows(text: str, after: str) -> dict[str, list[str]]:
  """{first cell: other cells} of the Markdown table that follows the line `after`."""
  lines = text[text.index(after):].splitlines()[1:]
  start = next(i for i, line in enumerate(lines) if line.startswith("|"))
  rows = {}
  for line in lines[start:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[cells[0]] = cells[1:]
  return rows


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline")
def test_tiny_pipeline_writes_every_stage_and_the_report(tiny_pipeline_workdir,
                                                         bundled_data_dir, bundled_tokenizer):
  w = tiny_pipeline_workdir
  config = tiny_pipeline_config(bundled_data_dir, bundled_tokenizer)
  summary = json.load(open(os.path.join(w, pipeline.SUMMARY)))
  for stage in pipeline.STAGES[:-1]:
    done = pipeline.read_done(os.path.join(w, stage))
    assert done is not None, f"{stage} has no DONE.json"
    assert done["config_hash"] == pipeline.config_hash(config, stage)
    assert done["seconds"] > (0 if stage in pipeline.TRAINED else -1)
    assert summary["stages"][stage]["line"] == done["line"]
  assert Checkpointer(os.path.join(w, "ppo", "checkpoints")).latest_step() == \
      config.ppo.train.steps

  results = json.load(open(os.path.join(w, "evaluate", "results.json")))
  assert results["policies"] == ["sft", "ppo", "kto", "dpo"]
  assert results["langs"] == ["en", "zh"]
  for lang in ("en", "zh"):
    assert results["metrics"]["sft"][lang]["win_rate"] == 0.5  # SFT against itself
    n = results["settings"]["prompts_per_lang"][lang]
    assert 0 < n <= config.evaluate.prompts_per_lang
    assert all(results["metrics"][p][lang]["n"] == n for p in results["policies"])
    samples = results["samples"][lang]
    assert len(samples) == config.evaluate.samples_per_lang
    for p in results["policies"]:  # the stored gold is the gold scorer's, recomputed here
      texts = [s["answers"][p] for s in samples]
      assert [s["gold"][p] for s in samples] == pytest.approx(
          labelers.score(texts, lang).tolist(), abs=1e-6)

  text = open(os.path.join(w, "report.md"), encoding="utf-8").read()
  for section in report.SECTIONS:
    assert f"\n## {section}\n" in text, section
  rows = _table_rows(text, "Win rate under the gold scorer")
  assert rows["language"] == ["SFT", "PPO", "KTO", "DPO"]
  for lang in ("en", "zh"):
    assert [float(x) for x in rows[lang]] == pytest.approx(
        [results["metrics"][p][lang]["win_rate"] for p in results["policies"]], abs=5e-4)
    assert results["samples"][lang][0]["prompt"][:40] in text
  # The config line says how long the RM trained (its steps, or its epochs when steps = 0),
  # and whether it ended on its moving average.
  rm_length = (f"RM {config.rm.train.steps}" if config.rm.train.steps else
               f"RM {config.rm.data.epochs} epoch{'' if config.rm.data.epochs == 1 else 's'}")
  assert config.rm.optim.ema_decay == 0.997
  assert f"{rm_length} (ending on its moving average, decay 0.997)," in text
  rm_rows = _table_rows(text, "| language | vs annotators")
  assert set(rm_rows) >= {"en", "zh"}
  ppo_eval = [r for r in read_metrics(os.path.join(w, "ppo")) if "eval/en/gold" in r]
  ppo_rows = [line for line in text.splitlines() if re.match(r"\| (en|zh) \| \d+ \|", line)]
  assert len(ppo_rows) == 2 * len(ppo_eval) > 0
  for name in report.PLOTS:
    width, height = _png_size(os.path.join(w, "plots", name))
    assert width > 200 and height > 100, name
    assert f"plots/{name}" in text
  _assert_verdicts_open_the_report(results, text, w)


def _assert_verdicts_open_the_report(results: dict, text: str, w: str):
  """Every policy but SFT has a verdict per language (greedy diversity included), and the
  report opens with them: the verdict table is its first table, before the raw win rates."""
  assert "sft" not in results["verdicts"]
  for p in results["policies"]:
    for lang in ("en", "zh"):
      d = results["diagnostics"][p][lang]
      assert 0 < d["greedy_distinct"] <= 1 and 0 < d["unique_answers"] <= 1
      assert d["gold_win"] == results["metrics"][p][lang]["win_rate"]
  assert text.index("|") == text.index("| policy | language | verdict |")
  assert text.index("## Verdicts") < text.index("## Stages") < text.index("Win rate under")
  rows = {tuple(line.split("|")[1:3]): line.split("|")[3].strip() for line in
          text[text.index("| policy | language | verdict |"):].split("\n\n")[0].splitlines()[2:]}
  assert len(rows) == len(results["policies"]) * 2
  for p in results["policies"][1:]:
    for lang in ("en", "zh"):
      verdict = results["verdicts"][p]["langs"][lang]["verdict"]
      assert verdict in ("collapsed", "hacked", "improved", "no change", "worse")
      assert rows[(f" {p.upper()} ", f" {lang} ")] == f"**{verdict}**"
  assert os.path.exists(os.path.join(w, "plots", "win_rates_gold_vs_check.png"))


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline")
def test_second_run_skips_every_stage_and_rebuilds_the_report(tiny_pipeline_workdir, tmp_path,
                                                              bundled_data_dir,
                                                              bundled_tokenizer):
  w = str(tmp_path / "w")
  shutil.copytree(tiny_pipeline_workdir, w)  # copy2 keeps the files' times
  os.remove(os.path.join(w, "report.md"))
  shutil.rmtree(os.path.join(w, "plots"))
  before = {}
  for root, _, files in os.walk(w):
    for name in files:
      path = os.path.join(root, name)
      before[path] = os.stat(path).st_mtime_ns
  # The command line, as `make demo` runs it a second time.
  out = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.recipe.pipeline", f"--config={SMOKE_CONFIG}",
       f"--config.data_dir={bundled_data_dir}", f"--config.tokenizer.path={bundled_tokenizer}",
       f"--workdir={w}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  for stage in pipeline.STAGES[:-1]:
    assert f"[{stage}] done earlier: skipped" in lines
  assert len(lines) == len(pipeline.STAGES), lines  # one line per stage, nothing else
  assert lines[-1].startswith("[report]")
  changed = [p for p, t in before.items()
             if os.path.exists(p) and os.stat(p).st_mtime_ns != t and
             not p.endswith(pipeline.SUMMARY)]
  assert changed == []  # no checkpoint, data or DONE file was touched
  assert os.path.exists(os.path.join(w, "report.md"))
  for name in report.PLOTS:
    _png_size(os.path.join(w, "plots", name))
  summary = json.load(open(os.path.join(w, pipeline.SUMMARY)))
  assert {summary["stages"][s]["status"] for s in pipeline.STAGES[:-1]} == {"skipped"}


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline")
def test_interrupted_stage_resumes_from_its_checkpoint(tiny_pipeline_workdir, tmp_path, caplog,
                                                       capsys, bundled_data_dir,
                                                       bundled_tokenizer):
  w = str(tmp_path / "w")
  config = tiny_pipeline_config(bundled_data_dir, bundled_tokenizer,
                                **{"ppo.train.stop_after": 1})
  total = config.ppo.train.steps
  assert total == 2
  summary = pipeline.run_pipeline(config, w, only="ppo", upstream=tiny_pipeline_workdir)
  assert summary["ppo"]["status"] == "stopped"
  assert f"[ppo] stopped at step 1 of {total}" in capsys.readouterr().out
  assert not os.path.exists(os.path.join(w, "ppo", pipeline.DONE))
  assert not os.path.exists(os.path.join(w, "report.md"))  # the run ended at the stop
  assert Checkpointer(os.path.join(w, "ppo", "checkpoints")).latest_step() == 1
  assert [r["step"] for r in read_metrics(os.path.join(w, "ppo"))] == [1]

  caplog.set_level("INFO", logger="rlhf_jax")
  summary = pipeline.run_pipeline(config, w, only="ppo", upstream=tiny_pipeline_workdir)
  assert summary["ppo"]["status"] == "ran"
  assert pipeline.read_done(os.path.join(w, "ppo")) is not None
  assert "resumed from" in caplog.text and "at step 1" in caplog.text
  # Step 1 was not trained again: the log goes on from it.
  assert [r["step"] for r in read_metrics(os.path.join(w, "ppo"))] == [1, 2]
  assert summary["sft"]["status"] == "upstream"
  assert summary["sft"]["dir"] == os.path.join(tiny_pipeline_workdir, "sft")
  assert os.path.exists(os.path.join(w, "report.md"))


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline")
def test_comparisons_killed_after_writing_are_redone_not_trusted(tiny_pipeline_workdir, tmp_path,
                                                                 monkeypatch, bundled_data_dir,
                                                                 bundled_tokenizer):
  from rlhf_jax.data import builders
  from rlhf_jax.data.rm_batches import read_records
  w = str(tmp_path / "w")
  config = tiny_pipeline_config(bundled_data_dir, bundled_tokenizer)
  answers = ["I love it, great!", "It was bad.", "ok then", "a terrible awful day"]
  monkeypatch.setattr(comparisons, "sample_answers",
                      lambda params, model_config, tokenizer, prompts, k, **kw:
                      [answers[:k] for _ in prompts])
  write = builders.write_comparisons

  def write_then_die(*args, **kwargs):
    write(*args, **kwargs)
    raise RuntimeError("killed after the dataset was written")

  monkeypatch.setattr(builders, "write_comparisons", write_then_die)
  with pytest.raises(RuntimeError, match="killed"):
    pipeline.run_pipeline(config, w, only="comparisons", upstream=tiny_pipeline_workdir)
  stage_dir = os.path.join(w, "comparisons")
  assert os.path.isdir(os.path.join(stage_dir, "tfds", "rlhf_comparisons"))
  assert pipeline.read_done(stage_dir) is None  # written, but not taken as complete
  with open(os.path.join(stage_dir, "tfds", "leftover"), "w") as f:
    f.write("from the killed attempt")

  monkeypatch.setattr(builders, "write_comparisons", write)
  pipeline.run_pipeline(config, w, only="comparisons", upstream=tiny_pipeline_workdir)
  assert pipeline.read_done(stage_dir) is not None
  assert not os.path.exists(os.path.join(stage_dir, "tfds", "leftover"))  # started over
  info = json.load(open(os.path.join(stage_dir, "info.json")))
  data_dir = os.path.join(stage_dir, "tfds")
  records = [r for split in ("train", "validation", "test")
             for r in _records_or_none(read_records, data_dir, split)]
  assert len(records) == info["records"] > 0
  assert all(r["responses"] == answers for r in records)


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline")
def test_comparison_rounds_answer_each_training_prompt_again(tiny_pipeline_workdir, tmp_path,
                                                             monkeypatch, bundled_data_dir,
                                                             bundled_tokenizer):
  """rounds=2: every training prompt is ranked twice, on fresh answers; held-out ones once."""
  from rlhf_jax.data.rm_batches import read_records
  calls = []

  def fake_answers(params, model_config, tokenizer, prompts, k, **kw):
    calls.append(list(prompts))
    # Answer j of occurrence i: distinct per occurrence, so the two rounds can be told apart.
    return [[f"answer {j} to occurrence {i}" for j in range(k)] for i in range(len(prompts))]

  monkeypatch.setattr(comparisons, "sample_answers", fake_answers)
  config = tiny_pipeline_config(bundled_data_dir, bundled_tokenizer, **{"comparisons.rounds": 0})
  with pytest.raises(ValueError, match="rounds must be >= 1"):
    pipeline.run_pipeline(config, str(tmp_path / "bad"), only="comparisons",
                          upstream=tiny_pipeline_workdir)
  assert not calls  # refused before any sampling

  config = tiny_pipeline_config(bundled_data_dir, bundled_tokenizer, **{"comparisons.rounds": 2})
  w = str(tmp_path / "w")
  pipeline.run_pipeline(config, w, only="comparisons", upstream=tiny_pipeline_workdir)
  (prompts,) = calls
  n_train = config.comparisons.prompts_per_lang * len(config.langs.split(","))
  train, heldout = prompts[:2 * n_train], prompts[2 * n_train:]
  assert train[:n_train] == train[n_train:]  # the same training prompts, twice
  assert len(set(map(str, heldout))) == len(heldout) and not set(map(str, heldout)) & set(
      map(str, train))
  data_dir = os.path.join(w, "comparisons", "tfds")
  records = [r for split in ("train", "validation", "test")
             for r in _records_or_none(read_records, data_dir, split)]
  assert len(records) == len(prompts)
  assert len({tuple(r["responses"]) for r in records}) == len(records)  # fresh answers each time


def _records_or_none(read_records, data_dir, split):
  try:
    return read_records("rlhf_comparisons/round0", split, data_dir)
  except ValueError:  # a split the hash left empty
    return []


def test_a_garbled_stage_marker_names_its_file(tmp_path):
  stage = tmp_path / "sft"
  stage.mkdir()
  for content, match in (("", "not valid JSON"), ("{garbage", "not valid JSON"),
                         ("[]", "expected a JSON object, got list")):
    (stage / pipeline.DONE).write_text(content)
    with pytest.raises(pipeline.MarkerError, match=re.escape(str(stage / pipeline.DONE))
                       + ": " + match):
      pipeline.read_done(str(stage))


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline")
def test_a_failed_evaluate_keeps_the_previous_results(tiny_pipeline_workdir, tmp_path,
                                                      bundled_data_dir, bundled_tokenizer):
  """--only=evaluate against a broken SFT fails, and the last good results.json is still
  there, byte for byte: new results replace the old only once they are complete."""
  from rlhf_jax.core import checkpoint as ckpt_lib
  from rlhf_jax.core import run_folder
  w = str(tmp_path / "w")
  shutil.copytree(tiny_pipeline_workdir, w)
  results = os.path.join(w, "evaluate", "results.json")
  before = open(results, "rb").read()
  step = run_folder.latest_step(os.path.join(w, "sft"))
  params_dir = os.path.join(run_folder.checkpoint_dir(os.path.join(w, "sft")), str(step),
                            "params")
  biggest = max((os.path.join(r, f) for r, _, fs in os.walk(params_dir) for f in fs),
                key=os.path.getsize)
  data = bytearray(open(biggest, "rb").read())
  data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
  open(biggest, "wb").write(bytes(data))
  config = tiny_pipeline_config(bundled_data_dir, bundled_tokenizer)
  with pytest.raises(ckpt_lib.CheckpointCorruptError):
    pipeline.run_pipeline(config, w, only="evaluate")
  assert open(results, "rb").read() == before
  assert pipeline.read_done(os.path.join(w, "evaluate")) is None  # the redo did not finish


def test_prompts_by_lang_takes_each_languages_first_prompts(bundled_data_dir, bundled_tokenizer,
                                                            tiny_config):
  """comparisons.prompts_by_lang 'en:3': three English training prompts, and they are the first
  three of the seven that prompts_per_lang=7 draws (one seed, one order), Chinese unchanged."""
  from rlhf_jax.config import validate
  from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
  tokenizer = load_any_tokenizer(bundled_tokenizer)
  kw = dict(data_dir=bundled_data_dir, seed=3, splits=("train",), langs=("en", "zh"),
            max_prompt_tokens=32)
  by_lang = lambda prompts, langs, lang: [p for p, l in zip(prompts, langs) if l == lang]
  seven = comparisons.choose_prompts(tokenizer, 7, **kw)
  mixed = comparisons.choose_prompts(tokenizer, {"en": 3, "zh": 7}, **kw)
  assert collections.Counter(mixed[1]) == {"en": 3, "zh": 7}
  assert by_lang(*mixed, "en") == by_lang(*seven, "en")[:3]
  assert by_lang(*mixed, "zh") == by_lang(*seven, "zh")
  for text, match in (("zh:0", r"'zh:0' is not 'lang:prompts' \(prompts >= 1\)"),
                      ("zh:2.5", "is not 'lang:prompts'"),
                      ("fr:3", r"'fr' is not one of the run's languages \['en', 'zh'\] \(langs\)")):
    with tiny_config.unlocked():
      tiny_config.comparisons.prompts_by_lang = text
    with pytest.raises(ValueError, match=r"comparisons\.prompts_by_lang.*" + match):
      validate.validate_or_raise(tiny_config, stages=["comparisons"])
