"""Bad config values are refused before any work, each named as it is overridden on the
command line; an unknown override names the nearest fields or lists the section's."""
import glob
import math
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from rlhf_jax.config import overrides, validate
from rlhf_jax.config import util as config_util
from rlhf_jax.train import launch
from rlhf_jax.recipe import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs",
                                                                          "*.py")))
TINY_MAX_LEN = 128  # rlhf_jax/models/sizes.py: the tiny model's max_len
TINY_PPO_PROMPT = 32  # configs/ppo.py: data.max_prompt_len at size=tiny


def load(spec, **fields):
  """`spec`'s config with `fields` ('a.b': value) set as --config.a.b would set them."""
  config = config_util.load_config(spec)
  with config.unlocked(), config.ignore_type():
    for key, value in fields.items():
      *parents, name = key.split(".")
      holder = config
      for part in parents:
        holder = holder[part]
      holder[name] = value
  return config


@pytest.mark.parametrize("spec", CONFIGS)
def test_every_config_file_is_valid_at_every_size(spec):
  for arg in ("", ":size=tiny", ":size=small", ":size=135m"):
    assert validate.problems(config_util.load_config(spec + arg)) == [], spec + arg
  if spec.endswith("pipeline.py"):
    assert validate.problems(config_util.load_config(spec + ":smoke=1")) == []


BAD = [
    # The defects: each ran (or died far from the cause) before.
    ("sft", {"optim.learning_rate": -1e-3}, r"optim\.learning_rate must be >= 0 \(got -0\.001\)"),
    ("sft", {"train.steps": -5}, r"train\.steps must be >= 0 \(got -5\)"),
    ("sft", {"data.seq_len": 0}, r"data\.seq_len must be >= 1 \(got 0\)"),
    # Ranges, types and cross-field limits.
    ("sft", {"optim.learning_rate": math.inf}, r"optim\.learning_rate must be finite"),
    ("sft", {"optim.learning_rate": "fast"}, r"optim\.learning_rate must be a number"),
    ("sft", {"train.steps": 2.5}, r"train\.steps must be an integer \(got 2\.5\)"),
    ("sft", {"data.seq_len": 129}, r"data\.seq_len must be <= model\.max_len=128 \(got 129\)"),
    ("sft", {"model.n_kv_heads": 3}, r"model\.n_kv_heads must divide model\.n_heads=4"),
    ("sft", {"data.loss_capacity": 1.5}, r"data\.loss_capacity must be in \[0, 1\] \(got 1\.5\)"),
    ("sft", {"optim.schedule": "cosin"}, r"optim\.schedule must be one of \['cosine', "),
    ("sft", {"tokenizer.path": "/no/such/tokenizer.model"}, r"tokenizer\.path does not exist"),
    ("ppo", {"ppo.minibatches": 3}, r"ppo\.minibatches does not divide the batch of 8 "),
    ("ppo", {"lora.rank": 4, "lora.dropout": 0.1}, r"lora\.dropout must be 0 for PPO: the "),
    ("sft", {"lora.rank": 4, "lora.dropout": 1.0}, r"lora\.dropout must be in \[0, 1\)"),
    ("ppo", {"ppo.clip_eps": 1.0}, r"ppo\.clip_eps must be in \(0, 1\) \(got 1\.0\)"),
    ("ppo", {"ppo.loss_mean": "episode"}, r"ppo\.loss_mean must be one of \['token', 'answer'\]"),
    ("ppo", {"kl.coef": -0.1}, r"kl\.coef: beta must be >= 0 \(got -0\.1\)"),
    ("ppo", {"kl.coef_by_lang": "fr:0.1"},
     r"kl\.coef_by_lang 'fr' is not one of the run's languages \['en', 'zh'\] \(data\.lang\)"),
    # 32 prompt tokens + 100 answer tokens > the tiny model's 128 positions.
    ("ppo", {"sampling.max_new_tokens": 100},
     r"sampling\.max_new_tokens \+ data\.max_prompt_len=32 must be <= model\.max_len=128"),
    ("ppo", {"sft_dir": "/no/such/run"}, r"sft_dir does not exist"),
    ("reward", {"data.max_answers": 1}, r"data\.max_answers must be >= 2 \(got 1\)"),
    ("reward", {"data.layout": "shared_prompt"}, r"data\.row_len must be >= 2 \(got 0\)"),
    ("reward", {"data.layout": "rows"}, r"data\.layout must be one of \['answers', "),
    ("reward", {"data.layout": "shared_prompt", "data.row_len": 200},
     r"data\.row_len must be <= model\.max_len=128 \(got 200\)"),
    ("sft", {"lora.rank": 4, "lora.base_quant": "int4"},
     r"lora\.base_quant must be one of \['', 'int8'\] \(got 'int4'\)"),
    ("dpo", {"lora.base_quant": "int8"}, r"lora\.base_quant needs lora\.rank > 0"),
    ("kto", {"optim.grad_accum": 2}, r"optim\.grad_accum must be 1 for KTO and DPO"),
    ("dpo", {"dpo.label_smoothing": 0.5}, r"dpo\.label_smoothing must be in \[0, 0\.5\)"),
]


@pytest.mark.parametrize("stage,fields,match", BAD)
def test_bad_value_is_refused_before_any_work(stage, fields, match, tmp_path):
  config = load(f"configs/{stage}.py:size=tiny", **fields)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match):
    launch.run(config, str(workdir))
  assert not workdir.exists()


def test_every_problem_is_listed_at_once():
  config = load("configs/sft.py:size=tiny", **{"optim.learning_rate": -1.0, "train.steps": -5,
                                               "data.seq_len": 0})
  with pytest.raises(ValueError) as info:
    validate.validate_or_raise(config)
  lines = str(info.value).splitlines()
  assert lines[0] == "3 problems in the config:"
  assert sorted(line.split()[0] for line in lines[1:]) == [
      "data.seq_len", "optim.learning_rate", "train.steps"]


def test_pipeline_refuses_a_bad_ppo_setting_before_the_first_stage(tmp_path):
  config = load("configs/pipeline.py:smoke=1", **{"ppo.optim.learning_rate": -1e-3,
                                                  "ppo.sampling.max_new_tokens": 100})
  workdir = tmp_path / "w"
  with pytest.raises(ValueError) as info:
    pipeline.run_pipeline(config, str(workdir))
  message = str(info.value)
  assert "ppo.optim.learning_rate must be >= 0 (got -0.001)" in message
  # Every stage's model takes the pretrain section's shape; the evaluation's answer length
  # follows PPO's, so it is refused too.
  for field in ("ppo.sampling.max_new_tokens", "evaluate.max_new_tokens"):
    assert (f"{field} + ppo.data.max_prompt_len={TINY_PPO_PROMPT} must be <= "
            f"pretrain.model.max_len={TINY_MAX_LEN} (got 100)") in message
  assert not workdir.exists()  # nothing written


def test_pipeline_checks_only_the_stages_it_runs():
  config = load("configs/pipeline.py:smoke=1", **{"ppo.ppo.clip_eps": 0.0})
  assert validate.problems(config) == ["ppo.ppo.clip_eps must be in (0, 1) (got 0.0)"]
  assert validate.problems(config, stages=["rm", "kto", "report"]) == []


def test_pipeline_section_paths_are_the_pipelines_to_fill():
  """A stage section's init_from or sft_dir is ignored (the pipeline sets it): not checked."""
  config = load("configs/pipeline.py:smoke=1", **{"ppo.sft_dir": "/no/such/run"})
  assert validate.problems(config) == []
  config = load("configs/pipeline.py:smoke=1", **{"tokenizer.path": "/no/such/tok.model"})
  assert validate.problems(config) == ["tokenizer.path does not exist (got '/no/such/tok.model')"]


# ---------------------------------------------------------------------------------------------
# Unknown overrides.


@pytest.mark.parametrize("spec,path,expected", [
    # kl.coef run together, under the wrong section: the nearest field alone.
    ("configs/ppo.py:size=tiny", "ppo.klcoef", "did you mean kl.coef?"),
    ("configs/pipeline.py", "ppo.klcoef", "did you mean ppo.kl.coef?"),
    ("configs/ppo.py:size=tiny", "ppo.clipeps", "did you mean ppo.clip_eps?"),
    ("configs/pipeline.py", "rm.eval.max_comparison", "did you mean rm.eval.max_comparisons?"),
    # Nothing near: the section's keys.
    ("configs/ppo.py:size=tiny", "kl.zzz", "config.kl has adaptive, coef, coef_by_lang, horizon, target"),
    ("configs/ppo.py:size=tiny", "kl.coef.x", "did you mean kl.coef?"),
    ("configs/ppo.py:size=tiny", "trainer.foo_bar_baz", "trainer is a field, not a section"),
])
def test_unknown_field_names_the_nearest_or_the_sections_keys(spec, path, expected):
  message = overrides.unknown_field_message(config_util.load_config(spec), path)
  assert message == f"unknown config field {path!r}; {expected}"


def test_known_fields_and_sections_are_not_unknown():
  config = config_util.load_config("configs/pipeline.py")
  for path in ("ppo.kl.coef", "ppo.kl", "evaluate.max_new_tokens", "seed"):
    assert overrides.unknown_field_message(config, path) is None


def test_flag_parsing_turns_the_bare_attribute_error_into_a_flag_error():
  argv = ["prog", "--config=configs/ppo.py:size=tiny", "--config.ppo.klcoef=0.1"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r"--config\.ppo\.klcoef: unknown config field 'ppo\.klcoef'; did "
                           r"you mean kl\.coef\?"):
    overrides.parse_flags(argv, flag_values=flag_values)


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


@pytest.mark.parametrize("override,match", [
    ("--config.optim.learning_rate=-1e-3", "optim.learning_rate must be >= 0 (got -0.001)"),
    ("--config.train.steps=-5", "train.steps must be >= 0 (got -5)"),
    ("--config.data.seq_len=0", "data.seq_len must be >= 1 (got 0)"),
    ("--config.optim.learnin_rate=1e-3", "did you mean optim.learning_rate?"),
])
def test_main_names_the_field_and_starts_nothing(override, match, tmp_path):
  out = run_cli("rlhf_jax.main", "--config=configs/sft.py:size=tiny", override,
                f"--workdir={tmp_path / 'w'}")
  assert out.returncode == 1
  assert match in out.stderr and "Traceback" not in out.stderr, out.stderr
  assert not (tmp_path / "w").exists()


def test_pipeline_cli_names_an_unknown_field_and_writes_nothing(tmp_path):
  out = run_cli("rlhf_jax.recipe.pipeline", "--config=configs/pipeline.py:smoke=1",
                "--config.ppo.klcoef=0.1", f"--workdir={tmp_path / 'w'}")
  assert out.returncode == 1
  assert "did you mean ppo.kl.coef?" in out.stderr and "Traceback" not in out.stderr
  assert not (tmp_path / "w").exists()
