"""The reward trainer end to end on a planted problem: comparisons graded by noisy annotators
(72.6% agreement) from a hidden rule; the RM, initialised from an "SFT" checkpoint, must learn
the rule (held-out accuracy against the rule's own ordering well above chance, in English and
Chinese), and its normalisation must give the SFT policy's answers mean 0 and std 1."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.recipe import comparisons
from rlhf_jax.config import util as config_util
from rlhf_jax.train import launch
from rlhf_jax.infer import rm_scores as reward
from rlhf_jax.data import builders
from rlhf_jax.core.metrics import read_metrics
from rlhf_jax.models import Transformer
from rlhf_jax.train import reward as rm_trainer

pytestmark = [pytest.mark.slow,  # one ~60 s training run shared by the tests below
              pytest.mark.xdist_group("reward_train")]  # built once, on one worker


def planted_config(data_dir, tokenizer_path, sft_dir, **overrides):
  config = config_util.load_config(
      "configs/reward.py:size=tiny,data=rlhf_comparisons/planted,seq_len=64")
  with config.unlocked():
    config.data.data_dir = data_dir
    config.tokenizer.path = tokenizer_path
    config.init_from = sft_dir
    config.data.epochs = 2
    config.optim.learning_rate = 2e-3
    config.eval.every = 8
    config.eval.scorer = "planted"
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2  # every mesh axis
    for key, value in overrides.items():
      section, name = key.split(".")
      config[section][name] = value
  return config


def save_sft(directory, model_config):
  """A stand-in SFT checkpoint: a freshly initialised policy of the RM's shape."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  from flax import linen as nn
  params = nn.unbox(jax.jit(Transformer(model_config).init)(jax.random.key(1), tokens, tokens,
                                                            jnp.ones_like(tokens))["params"])
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  ckpt.save(1, params, {"step": jnp.ones((), jnp.int32)}, {}, {})
  ckpt.close()
  return params


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, bundled_tokenizer):
  root = tmp_path_factory.mktemp("planted")
  records, info = comparisons.planted_records(240, 4, seed=0)
  for lang in ("en", "zh"):  # the annotators are as noisy as people
    assert abs(info["langs"][lang]["expected_agreement"] - 0.726) < 0.01
  data_dir = str(root / "tfds")
  # A fifth held out (the default 5% would be a dozen comparisons: too few to measure on).
  builders.write_comparisons(records, config="planted", data_dir=data_dir,
                             fractions=(0.8, 0.2, 0.0))
  config = planted_config(data_dir, bundled_tokenizer, str(root / "sft" / "checkpoints"))
  model_config = rm_trainer.build_model_config(config, 2048)
  sft_params = save_sft(config.init_from, model_config)
  workdir = str(root / "rm")
  metrics = launch.run(config, workdir)
  return {"metrics": metrics, "workdir": workdir, "config": config, "sft": sft_params,
          "tokenizer": bundled_tokenizer}


def test_held_out_accuracy_rises_well_above_chance(planted_run):
  m = planted_run["metrics"]
  assert m["eval/rm/gold_accuracy"] > 0.8, m
  for lang in ("en", "zh"):
    assert m[f"eval/rm/gold_accuracy/{lang}"] > 0.7, (lang, m)
  evals = [r for r in read_metrics(planted_run["workdir"]) if "eval/rm/gold_accuracy" in r]
  assert len(evals) >= 3
  assert evals[-1]["eval/rm/gold_accuracy"] > evals[0]["eval/rm/gold_accuracy"] + 0.05


def test_shared_prompt_layout_learns_the_planted_preference_too(planted_run, tmp_path):
  """The run in the shared_prompt layout (each comparison's prompt once, its answers after it:
  the batch keys, the mesh, the held-out evaluation and the normalisation all read it) learns
  as the answers layout does. Its rows hold whole comparisons (up to 4 x 64 positions here),
  so the model's max_len is raised for them; the equal loss and gradients of the two layouts
  on one batch are test_reward_inputs.py's."""
  base = planted_run["config"]
  config = planted_config(base.data.data_dir, planted_run["tokenizer"], base.init_from,
                          **{"data.layout": "shared_prompt", "data.row_len": 256,
                             "model.max_len": 256})
  metrics = launch.run(config, str(tmp_path / "rm"))
  assert metrics["eval/rm/gold_accuracy"] > 0.8, metrics
  tokens = {name: np.mean([r["train/tokens"] for r in read_metrics(d) if "train/tokens" in r])
            for name, d in (("shared", str(tmp_path / "rm")), ("rows", planted_run["workdir"]))}
  # 715 against 1,215 real positions a step when written: the answers layout's rows also
  # lose 44 prompts' oldest tokens to their 64 positions, the shared rows none.
  assert tokens["shared"] < 0.7 * tokens["rows"]


def test_metrics_are_logged_per_language(planted_run):
  logged = read_metrics(planted_run["workdir"])
  keys = set().union(*logged)
  for name in ("rm/loss", "rm/accuracy", "rm/margin"):
    assert {name, f"{name}/en", f"{name}/zh", f"eval/{name}", f"eval/{name}/en",
            f"eval/{name}/zh"} <= keys, name
  assert {"eval/rm/ece", "train/comparisons_per_s", "data/skipped_no_pairs"} <= keys
  assert planted_run["metrics"]["data/skipped_no_pairs"] == 0


def test_checkpoint_holds_the_rm_with_the_sft_trunk_shape(planted_run):
  params = ckpt_lib.read_params(os.path.join(planted_run["workdir"], "checkpoints"))
  assert set(params) == {"trunk", "head"}
  sft = planted_run["sft"]
  trunk_shapes = jax.tree.map(np.shape, params["trunk"])
  assert trunk_shapes == jax.tree.map(np.shape, {k: v for k, v in sft.items() if k != "lm_head"})


def test_normalization_gives_the_policy_answers_mean_zero_std_one(planted_run):
  workdir = planted_run["workdir"]
  with open(os.path.join(workdir, reward.NORMALIZATION_FILE)) as f:
    norm = json.load(f)
  assert set(norm) == {"gain", "bias", "mean_raw", "std_raw", "n"}
  with open(os.path.join(workdir, "normalization_sample.jsonl")) as f:
    sample = [json.loads(line) for line in f]
  config = planted_run["config"]
  assert len(sample) == norm["n"] == config.normalize.num_prompts  # one answer per prompt
  # Re-score the sample through the public API: normalised scores have mean 0 and std 1.
  from rlhf_jax.text import tokenizer as tok_lib
  model_config, params, gain, bias = reward.load_reward_model(workdir)
  tokenizer = tok_lib.Tokenizer.load(planted_run["tokenizer"])
  scores = reward.score_texts(params, model_config, tokenizer, [s["prompt"] for s in sample],
                              [s["answer"] for s in sample], gain=gain, bias=bias,
                              seq_len=config.data.seq_len)
  assert abs(scores.mean()) < 1e-3 and abs(scores.std() - 1.0) < 1e-3
  np.testing.assert_allclose((np.array([s["raw"] for s in sample]) - norm["mean_raw"])
                             / norm["std_raw"], scores, atol=1e-3)


def test_rerun_of_a_finished_run_trains_nothing_more(planted_run):
  workdir = planted_run["workdir"]
  before = os.path.getmtime(os.path.join(workdir, reward.NORMALIZATION_FILE))
  metrics = launch.run(planted_run["config"], workdir)
  assert metrics["eval/rm/gold_accuracy"] == pytest.approx(
      planted_run["metrics"]["eval/rm/gold_accuracy"])
  assert os.path.getmtime(os.path.join(workdir, reward.NORMALIZATION_FILE)) == before


def test_held_out_evaluator_equals_the_one_device_evaluation(planted_run):
  """The trainer's held-out evaluator (eval/held_out.py: batched and sharded over 8 devices)
  gives the numbers the RM's one-device command-line evaluation computes on the same params
  and comparisons (the command with its defaults: the run's data, split and checkpoint): two
  code paths, one result."""
  from rlhf_jax.eval import reward_model as evaluate_rm
  config = planted_run["config"]
  result = evaluate_rm.main(["--workdir", planted_run["workdir"]])
  want = result["metrics"]
  assert result["split"] == config.eval.split
  got = planted_run["metrics"]  # the evaluator's last numbers, on the final params
  bon = [k[len("eval/rm/"):] for k in got if k.startswith("eval/rm/gold_bon")]
  assert bon, "best-of-n is reported where comparisons have three or more answers"
  for key in ("accuracy", "gold_accuracy", "accuracy/en", "gold_accuracy/zh", "pairs", *bon):
    assert got[f"eval/rm/{key}"] == pytest.approx(want[key], rel=1e-6), key
  assert got["eval/rm/margin"] == pytest.approx(want["margin"], rel=1e-4, abs=1e-5)


def test_one_device_evaluation_reads_the_shared_prompt_layout_alike(planted_run):
  """The command-line evaluation reads a run in its own data layout: in 'shared_prompt' (each
  comparison's prompt written once, its answers attending to it) the metrics equal the
  'answers' layout's (every prompt + answer a row of its own) on the same params."""
  from rlhf_jax.core import run_folder
  from rlhf_jax.data.rm_batches import read_records
  from rlhf_jax.eval import reward_model as evaluate_rm
  config = planted_run["config"]
  params, model_config = run_folder.load_scalar_model(planted_run["workdir"])
  records = read_records(config.data.name, config.eval.split, config.data.data_dir)
  tokenizer = run_folder.tokenizer(planted_run["workdir"])
  seq_len = 4 * config.data.seq_len  # room for every answer whole, in either layout
  common = dict(seq_len=seq_len, max_answers=config.data.max_answers,
                scorer=config.eval.scorer, bins=config.eval.bins)
  flat, _ = evaluate_rm.evaluate_records(params, model_config, tokenizer, records, **common)
  shared, _ = evaluate_rm.evaluate_records(
      params, model_config, tokenizer, records, layout="shared_prompt",
      row_len=seq_len * config.data.max_answers, **common)
  assert flat["data/truncated_answers"] == shared["data/truncated_answers"] == 0
  for key in ("accuracy", "gold_accuracy", "accuracy/en", "gold_accuracy/zh", "pairs"):
    assert shared[key] == pytest.approx(flat[key], rel=1e-6), key
  assert shared["margin"] == pytest.approx(flat["margin"], rel=1e-4, abs=1e-5)
