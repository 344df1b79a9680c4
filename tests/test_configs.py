"""Every config file builds, and runs a couple of steps at size=tiny; bad arguments are clear."""
import glob
import os

import pytest

from rlhf_jax.config import util as config_util
from rlhf_jax.train import launch
from rlhf_jax.core.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a config needs to run on the bundled data alone, with no earlier stage's output: the
# reward model's default data are comparisons sampled from an SFT model, so its tiny run trains
# on the bundled thumbs instead (the binary loss); DPO's on pairs of a liked and a disliked
# answer to the same prompt in those thumbs.
RUN_ARGS = {"configs/reward.py": ",data=rlhf_feedback", "configs/dpo.py": ",data=rlhf_feedback"}
CONFIG_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs",
                                                                               "*.py"))
                      # one section per stage config, not a stage: tests/test_pipeline.py
                      if os.path.basename(p) != "pipeline.py")


def test_there_are_configs():
  assert {"configs/pretrain.py", "configs/sft.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_builds_at_every_size(path):
  for size in ("tiny", "small", "135m"):
    config = config_util.load_config(f"{path}:size={size}")
    assert config.model.size == size
    assert config.trainer in launch.TRAINERS


# PPO's, DPO's, KTO's and the RM's two steps from random weights cost 20 s to a minute each cold
# (PPO compiles a sampler, an experience pass and an update); their trainers run in make test
# through the tiny pipeline (tests/test_pipeline.py), from these same stage configs. make
# test-all runs them here.
HEAVY_RUNS = {"configs/ppo.py", "configs/dpo.py", "configs/kto.py", "configs/reward.py"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.heavy) if p in HEAVY_RUNS
                                  else p for p in CONFIG_FILES])
def test_config_runs_two_steps_at_tiny(path, tmp_path, bundled_data_dir, bundled_tokenizer):
  config = config_util.load_config(f"{path}:size=tiny,steps=2{RUN_ARGS.get(path, '')}")
  with config.unlocked():
    config.data.data_dir = bundled_data_dir
    config.tokenizer.path = bundled_tokenizer
  metrics = launch.run(config, str(tmp_path))
  assert metrics["train/tokens"] > 0
  assert [m["step"] for m in read_metrics(str(tmp_path))][-1] == 2


def test_unknown_config_argument_names_close_matches():
  with pytest.raises(ValueError, match=r"unknown config argument 'szie'.*'size'"):
    config_util.load_config("configs/sft.py:szie=tiny")


def test_unknown_config_field_is_an_error():
  config = config_util.load_config("configs/sft.py:size=tiny")
  with pytest.raises(AttributeError, match=r"learning_rate"):
    config.optim.learning_rat = 1.0


def test_unknown_size_is_an_error():
  with pytest.raises(ValueError, match=r"unknown model size 'smal'.*'small'"):
    config_util.load_config("configs/sft.py:size=smal")


def test_bad_value_type_is_an_error():
  with pytest.raises(ValueError, match=r"steps"):
    config_util.load_config("configs/sft.py:steps=many")
