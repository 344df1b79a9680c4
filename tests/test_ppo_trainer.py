"""The PPO host loop: bad input fails before anything compiles, models load from SFT and RM
workdirs (the critic with the RM's normalisation folded in), a NaN reward stops the run and
keeps the last good checkpoint, and a run resumed mid-way (PPO-ptx and EMA on) ends exactly
where an unbroken one does."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppo_setup as S
from helpers import write_run
from rlhf_jax.config import util as config_util
from rlhf_jax.train import launch
from rlhf_jax.core.checkpoint import Checkpointer, read_params
from rlhf_jax.core.metrics import read_metrics
from rlhf_jax.models import ScalarModel, Transformer, model_config
from rlhf_jax.rl import state as ppo_state
from rlhf_jax.rl import trainer as ppo_trainer


def _model_fields(vocab):
  fields = config_util.model_section("tiny").to_dict()
  fields["vocab_size"] = vocab
  return fields


def _write_run(workdir, params, model_config, gain=None, bias=0.0):
  """A run folder as the SFT or RM stage leaves it: record, checkpoints/ (+ normalization.json).
  No tokenizer: these runs only give the PPO run its models' shapes and params."""
  kind = "scalar" if "trunk" in params else "policy"
  write_run(workdir, params, model_config, "", kind=kind,
            saved={"model": _model_fields(model_config.vocab_size)})
  if gain is not None:
    with open(os.path.join(workdir, "normalization.json"), "w") as f:
      json.dump({"gain": gain, "bias": bias}, f)
  return workdir


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory, bundled_tokenizer):
  """SFT and RM workdirs of tiny models with the bundled tokenizer's vocabulary (2048), and an
  RM with a different vocabulary."""
  root = tmp_path_factory.mktemp("stages")
  cfg = model_config("tiny", vocab_size=2048)
  sft = _write_run(str(root / "sft"), S.random_params(Transformer(cfg), 0), cfg)
  rm = _write_run(str(root / "rm"), S.random_params(ScalarModel(cfg), 1), cfg, gain=2.0,
                  bias=-0.5)
  small = model_config("tiny", vocab_size=64)
  rm64 = _write_run(str(root / "rm64"), S.random_params(ScalarModel(small), 1), small, gain=1.0)
  sft64 = _write_run(str(root / "sft64"), S.random_params(Transformer(small), 0), small)
  return {"sft": sft, "rm": rm, "rm64": rm64, "sft64": sft64}


def _config(data_dir, tokenizer, steps=2, **fields):
  """configs/ppo.py at size=tiny on the bundled data; `fields`: {'section.name': value}."""
  config = config_util.load_config(f"configs/ppo.py:size=tiny,steps={steps}")
  with config.unlocked():
    config.data.data_dir = data_dir
    config.tokenizer.path = tokenizer
    config.eval.n_prompts = 0
    config.train.checkpoint_every = 1
    for key, value in fields.items():
      section, name = key.rsplit(".", 1) if "." in key else (None, key)
      (config[section] if section else config)[name] = value
  return config


@pytest.mark.parametrize("fields,match", [
    ({"kl.coef": -0.1}, "beta must be >= 0"),
    ({"kl.coef_by_lang": "zh:0.1", "data.lang": "en"}, "'zh' is not one of the run's languages"),
    ({"ppo.clip_eps": 1.2}, "clip_eps must be in"),
    ({"ppo.value_clip": 0.0}, "value_clip must be in"),
    ({"ppo.minibatches": 3}, "does not divide the batch of 8"),
    ({"ppo.optimizer": "adam"}, "ppo.optimizer"),
    ({"ppo.critic_trunk": "shared"}, "ppo.critic_trunk"),
    ({"data.lang": "fr"}, "data.lang"),
    ({"rm_dir": "rm64"}, "reward model checkpoint .* vocabulary of 64 tokens"),
    ({"sft_dir": "sft64"}, "SFT checkpoint .* vocabulary of 64 tokens"),
])
def test_bad_input_is_a_clear_error_before_compiling(fields, match, tmp_path, monkeypatch,
                                                     stage_dirs, bundled_tokenizer):
  def no_compiling(*args, **kwargs):
    raise AssertionError("compiled before the input was checked")
  monkeypatch.setattr(ppo_trainer, "create_models", no_compiling)
  fields = {k: stage_dirs.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
  config = _config("unused", bundled_tokenizer, **fields)
  with pytest.raises(ValueError, match=match):
    launch.run(config, str(tmp_path))


def test_critic_starts_as_the_normalised_reward_model():
  cfg = model_config("tiny", vocab_size=S.V)
  params = S.random_params(ScalarModel(cfg), 3)
  tokens, mask = S.prompts(4, seed=1)
  apply = jax.jit(lambda p: ScalarModel(cfg).apply({"params": p}, tokens,
                                                   jnp.cumsum(mask, -1), mask))
  folded = ppo_state.fold_normalization(params, jnp.float32(2.0), jnp.float32(-0.5))
  np.testing.assert_allclose(np.asarray(apply(folded)), 2.0 * np.asarray(apply(params)) - 0.5,
                             rtol=1e-5, atol=1e-5)


def test_loaded_parts_stay_abstract_and_the_rest_is_drawn_as_before():
  """create_models(loaded=...) leaves the parts a run loads as ShapeDtypeStructs with the
  shapes and shardings of the full init, and draws the others exactly as the full init does
  (the same keys: dropping outputs only removes their draws from the program)."""
  import optax
  from rlhf_jax.core import sharding
  from rlhf_jax.rl import kl, ppo
  cfg = model_config("tiny", vocab_size=S.V)
  models = ppo.PPOModels(policy=cfg, critic=cfg, reward=cfg)
  mesh, rules = sharding.make_mesh({"data": -1}), sharding.axis_rules(None)
  args = (models, optax.adam(1e-3), kl.KLController(init_coef=0.1), 1.0, 0.0, mesh, rules, 0)
  (full, full_frozen), _ = ppo_trainer.create_models(*args)
  (state, frozen), _ = ppo_trainer.create_models(*args, loaded={"policy", "reward"})
  for got, want in ((state.params["policy"], full.params["policy"]),
                    (frozen.reward, full_frozen.reward)):
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.shape == y.shape
               and x.sharding == y.sharding for x, y in zip(jax.tree.leaves(got),
                                                            jax.tree.leaves(want)))
  for got, want in ((state.params["critic"], full.params["critic"]), (state.opt_state,
                    full.opt_state), (frozen.reference, full_frozen.reference)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
  with pytest.raises(RuntimeError, match="unloaded leaves"):
    ppo_trainer.check_filled(state, frozen)
  with pytest.raises(ValueError, match=r"loaded parts \['ema'\]"):
    ppo_trainer.create_models(*args, loaded={"ema"})


def _params_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.heavy  # two PPO runs from configs/ppo.py (about a minute cold)
@pytest.mark.slow
@pytest.mark.parametrize("optimizer,critic_trunk,coef_by_lang", [
    ("joint", "trained", ""), ("per_model", "trained", ""), ("per_model", "frozen", "zh:0.1")])
def test_resume_mid_run_then_nan_reward_stops_and_keeps_the_checkpoint(
    optimizer, critic_trunk, coef_by_lang, tmp_path, stage_dirs, bundled_data_dir,
    bundled_tokenizer):
  # Every run has the same schedule (3 iterations); stop_after ends the first ones early.
  # PPO-ptx and the EMA are on, so their data position and state must resume too; per_model
  # checkpoints one optimizer state per model, a frozen critic trunk a head alone, and
  # kl.coef_by_lang one β per language.
  dirs = {"sft_dir": stage_dirs["sft"], "rm_dir": stage_dirs["rm"], "steps": 3,
          "ptx.coef": 0.5, "ppo.ema_decay": 0.9, "ppo.optimizer": optimizer,
          "ppo.critic_trunk": critic_trunk, "kl.coef_by_lang": coef_by_lang}
  whole, broken = str(tmp_path / "whole"), str(tmp_path / "broken")
  launch.run(_config(bundled_data_dir, bundled_tokenizer, **{"train.stop_after": 2}, **dirs),
             whole)
  first = launch.run(_config(bundled_data_dir, bundled_tokenizer, **{"train.stop_after": 1},
                             **dirs), broken)
  assert Checkpointer(os.path.join(broken, "checkpoints")).latest_step() == 1
  assert first["objective/kl"] == pytest.approx(0.0, abs=1e-3)  # reference = SFT = policy
  launch.run(_config(bundled_data_dir, bundled_tokenizer, **{"train.stop_after": 2}, **dirs),
             broken)

  assert _params_equal(read_params(os.path.join(whole, "checkpoints")),
                       read_params(os.path.join(broken, "checkpoints")))
  rows_whole, rows_broken = read_metrics(whole), read_metrics(broken)
  assert [r["step"] for r in rows_broken] == [1, 2]
  for key in ("objective/scores", "objective/kl", "ppo/loss/policy", "ppo/loss/ptx",
              "objective/kl_coef") + (("objective/zh/kl_coef",) if coef_by_lang else ()):
    assert rows_whole[-1][key] == rows_broken[-1][key], key
  assert rows_whole[-1]["ppo/loss/ptx"] > 0
  # β followed the adaptive formula from iteration 1's KL (8 episodes, horizon 10000); one β
  # per language each from its language's KL (4 episodes each).
  if not coef_by_lang:
    kl1 = rows_whole[0]["objective/kl"]
    assert rows_whole[1]["objective/kl_coef"] == pytest.approx(
        0.05 * (1 + np.clip(kl1 / 6.0 - 1, -0.2, 0.2) * 8 / 10000), rel=1e-5)
  else:
    for lang, beta in (("en", 0.05), ("zh", 0.1)):
      assert rows_whole[0][f"objective/{lang}/kl_coef"] == pytest.approx(beta, rel=1e-6)
      kl1 = rows_whole[0][f"objective/{lang}/kl"]
      assert rows_whole[1][f"objective/{lang}/kl_coef"] == pytest.approx(
          beta * (1 + np.clip(kl1 / 6.0 - 1, -0.2, 0.2) * 4 / 10000), rel=1e-5)
  # The policy loaded from SFT; the critic from the RM with gain 2, bias -0.5 folded in.
  sft = read_params(os.path.join(stage_dirs["sft"], "checkpoints"))
  assert not _params_equal(sft, read_params(os.path.join(whole, "checkpoints")))

  # A NaN reward (the RM's gain) at iteration 3: stopped with its number, checkpoint 2 kept.
  with open(os.path.join(stage_dirs["rm"], "normalization.json"), "w") as f:
    json.dump({"gain": float("nan"), "bias": 0.0}, f)
  try:
    with pytest.raises(ppo_trainer.NonFiniteRewardError, match="iteration 3.*iteration 2"):
      launch.run(_config(bundled_data_dir, bundled_tokenizer, **dirs), broken)
  finally:
    with open(os.path.join(stage_dirs["rm"], "normalization.json"), "w") as f:
      json.dump({"gain": 2.0, "bias": -0.5}, f)
  assert Checkpointer(os.path.join(broken, "checkpoints")).latest_step() == 2
  assert [r["step"] for r in read_metrics(broken)] == [1, 2]
