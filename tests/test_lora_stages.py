"""LoRA in the reward model and DPO: the RM's head trains in full beside the adapters, DPO's
reference is the frozen base with the adapters off (step 1 runs at ratio 1: loss log 2), and
both run folders hold adapters (and head) only and open folded onto their recorded base."""
import math
import os

import jax
import pytest
from helpers import write_policy_run
from test_preference import data_dir, run_config  # noqa: F401 (a fixture)

from rlhf_jax.config import util as config_util
from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.core import run_folder
from rlhf_jax.core.metrics import read_metrics
from rlhf_jax.models import lora
from rlhf_jax.train import launch

# Two short trainings (~2 minutes cold): `make test-all`. make test keeps LoRA's SFT runs
# (test_lora_train.py) and its PPO step (test_lora_ppo.py).
pytestmark = [pytest.mark.slow, pytest.mark.heavy]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, bundled_tokenizer):
  workdir = str(tmp_path_factory.mktemp("lora_sft") / "sft")
  write_policy_run(workdir, bundled_tokenizer, 2048)
  return workdir


def test_dpo_with_lora_starts_at_the_base_and_learns(tmp_path, data_dir, bundled_tokenizer,
                                                     sft_run):
  config = run_config("dpo", "rlhf_comparisons/mini", data_dir, bundled_tokenizer, sft_run,
                      batch=16, **{"lora.rank": 4, "optim.learning_rate": 1e-2})
  workdir = str(tmp_path / "dpo")
  metrics = launch.run(config, workdir)
  # Step 1: the policy is the base plus zero adapters, the reference the base: every log-ratio
  # is 0, so the loss is -log σ(0) = log 2 and the held-out accuracy a tie.
  losses = [m["dpo/loss"] for m in read_metrics(workdir) if "dpo/loss" in m]
  assert losses[0] == pytest.approx(math.log(2.0), rel=1e-5)
  assert metrics["eval/dpo/initial/accuracy"] == 0.5
  assert losses[-1] < losses[0] - 0.05, losses
  assert metrics["eval/dpo/accuracy"] > 0.5, metrics

  saved = ckpt_lib.read_params(run_folder.checkpoint_dir(workdir))
  assert lora.count_adapters(saved) == len(jax.tree.leaves(saved)) == 28  # 7 x 2 x 2 layers
  record = run_folder.read_record(workdir)
  assert record["base"]["source"] == os.path.abspath(sft_run)
  folded, config_out = run_folder.load_policy(workdir)
  assert config_out.lora_rank == 0 and lora.count_adapters(folded) == 0


def test_reward_model_with_lora_trains_its_head_in_full(tmp_path, data_dir, bundled_tokenizer,
                                                        sft_run):
  config = config_util.load_config(
      "configs/reward.py:size=tiny,data=rlhf_comparisons/mini,seq_len=48")
  with config.unlocked():
    config.init_from = sft_run
    config.data.data_dir = data_dir
    config.tokenizer.path = bundled_tokenizer
    config.data.epochs = 4
    config.data.batch_size = 8
    config.train.log_every = 1
    config.eval.split = ""
    config.normalize.enabled = False
    config.lora.rank = 4
    config.optim.learning_rate = 1e-2
  workdir = str(tmp_path / "rm")
  launch.run(config, workdir)
  saved = ckpt_lib.read_params(run_folder.checkpoint_dir(workdir))
  adapters = lora.count_adapters(saved)
  assert adapters == 28 and set(saved) == {"trunk", "head"}
  assert len(jax.tree.leaves(saved)) == adapters + 2  # the head's kernel and bias
  record = run_folder.read_record(workdir)
  assert record["kind"] == "scalar" and record["base"]["as"] == "trunk"
  folded, config_out = run_folder.load_scalar_model(workdir)
  assert config_out.lora_rank == 0 and lora.count_adapters(folded) == 0
  assert "lm_head" not in folded["trunk"] and set(folded) == {"trunk", "head"}
  losses = [m["rm/loss"] for m in read_metrics(workdir) if "rm/loss" in m]
  assert losses[-1] < losses[0], losses
