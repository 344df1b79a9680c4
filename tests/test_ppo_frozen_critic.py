"""PPO with `critic_trunk="frozen"`: the critic is a value head on the reward model's frozen
trunk. One trunk pass gives the RM's scores and every value; the update trains the head on the
kept features and never runs a trunk.

The references are the trained-critic path on the same numbers (a whole scalar model whose
trunk is the RM's and whose head is the critic's), which reads values and scores through
other code (`answer_values`, `reward_model_scores`): the two must agree, and the head's
gradient must be the head part of the whole model's gradient."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ppo_setup as S
from test_lora_ppo import LORA, _adapters, _shared_base_runs
from test_ppo import CONTROLLER, N, planted_reward

from rlhf_jax.infer import rollout
from rlhf_jax.infer.sampling import SamplingParams
from rlhf_jax.models import Transformer, lora
from rlhf_jax.rl import ppo
from rlhf_jax.rl import state as ppo_state

TRAINED = ppo.PPOHyper(epochs=2, minibatches=2, temperature=0.7, missing_eos_penalty=-1.0)
FROZEN = dataclasses.replace(TRAINED, critic_trunk="frozen")
GAIN, BIAS = 2.0, -0.5


def _rollout(rows=16):
  """Answers of a random policy to ragged prompts; 8 stop tokens of 64 make them ragged."""
  tokens, mask = S.prompts(rows, seed=5)
  sample = rollout.make_rollout_fn(S.CFG, N, tuple(range(1, 9)), S.PAD,
                                   SamplingParams(temperature=3.0))
  ro = sample({"params": S.policy_params(0)}, tokens, mask, jax.random.key(2))
  lengths = np.asarray(ro.lengths)
  assert len(set(lengths.tolist())) > 2 and lengths.min() < N and np.asarray(ro.ended).any()
  return ro


def _critics():
  """(the whole critic of the trained path, the frozen path's head): the RM's trunk, its
  head with the normalisation folded in, as the trainer starts both."""
  reward = S.scalar_params(1)
  whole = ppo_state.fold_normalization(reward, jnp.float32(GAIN), jnp.float32(BIAS))
  return reward, whole, {"head": whole["head"]}


def test_one_rm_trunk_pass_gives_the_trained_paths_values_scores_and_advantages():
  ro = _rollout()
  reward, whole, head = _critics()
  frozen = S.frozen(S.policy_params(0), reward, GAIN, BIAS)
  run = lambda hyper, critic: jax.jit(functools.partial(  # noqa: E731
      ppo.make_experience, models=S.MODELS, hyper=hyper))(
          {"policy": S.policy_params(0), "critic": critic}, frozen, ro, jnp.float32(0.1))
  (ref, ref_metrics), (got, metrics) = run(TRAINED, whole), run(FROZEN, head)
  assert ref.critic_features is None
  assert got.critic_features.shape == (16, N, S.CFG.d_model)
  for name in ("old_values", "scores", "advantages", "returns", "kl"):
    np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)),
                               rtol=1e-5, atol=1e-5, err_msg=name)
  # The scores are the RM's, not only the critic's first values: an ended answer's score is
  # the normalised RM at its last token, a cut-off one the missing-EOS penalty.
  ended = np.asarray(ro.ended)
  assert np.all(np.asarray(got.scores)[~ended] == -1.0)
  assert np.ptp(np.asarray(got.scores)[ended]) > 0.1
  np.testing.assert_allclose(float(metrics["objective/rm_scores"]),
                             float(ref_metrics["objective/rm_scores"]), rtol=1e-5)


def test_a_mean_pooled_rm_scores_each_answer_by_its_values_mean_on_either_path():
  """An RM with score_pool="mean" scores an episode by its head's mean over the answer's own
  tokens, on the trained path (`reward_model_scores`) and on the one-pass frozen path alike;
  the reference is the whole scalar model's values averaged in numpy over the answer columns."""
  from rlhf_jax.models.heads import ScalarModel
  ro = _rollout()
  reward, whole, head = _critics()
  frozen = S.frozen(S.policy_params(0), reward, GAIN, BIAS)
  models = dataclasses.replace(S.MODELS, reward=dataclasses.replace(S.CFG, score_pool="mean"))
  values = np.asarray(ScalarModel(S.CFG).apply({"params": reward}, ro.tokens, ro.positions,
                                               ro.segment_ids))  # [B, S]
  mask = np.asarray(ro.answer_mask)  # [B, N]: the answer is the last N columns
  want = GAIN * (values[:, -N:] * mask).sum(1) / np.maximum(mask.sum(1), 1) + BIAS
  last = GAIN * values[np.arange(len(mask)), values.shape[1] - N - 1 + mask.sum(1).astype(int)]
  assert np.max(np.abs(want - (last + BIAS))) > 0.05  # the readouts differ on these numbers
  for hyper, critic in ((TRAINED, whole), (FROZEN, head)):
    hyper = dataclasses.replace(hyper, missing_eos_penalty=None)
    exp, _ = jax.jit(functools.partial(ppo.make_experience, models=models, hyper=hyper))(
        {"policy": S.policy_params(0), "critic": critic}, frozen, ro, jnp.float32(0.1))
    np.testing.assert_allclose(np.asarray(exp.scores), want, rtol=1e-5, atol=1e-5,
                               err_msg=hyper.critic_trunk)


def test_the_heads_gradient_is_the_head_part_of_the_whole_models():
  ro = _rollout(8)
  reward, whole, head = _critics()
  frozen = S.frozen(S.policy_params(0), reward, GAIN, BIAS)
  exp, _ = jax.jit(functools.partial(ppo.make_experience, models=S.MODELS, hyper=FROZEN))(
      {"policy": S.policy_params(0), "critic": head}, frozen, ro, jnp.float32(0.0))
  # Move the head so the value loss is not at its minimum (returns differ from old values).
  rng = np.random.default_rng(0)
  moved = jax.tree.map(lambda x: x + 0.3 * jnp.asarray(rng.normal(size=x.shape), x.dtype), head)
  kw = dict(models=S.MODELS, hyper=FROZEN)
  grad = jax.jit(jax.grad(lambda c, e: ppo.value_terms(c, e, **kw)[0]))  # jitted: see test_ppo
  grad_head = grad(moved, exp)
  grad_whole = grad({**whole, "head": moved["head"]}, exp._replace(critic_features=None))
  assert jax.tree.structure(grad_head) == jax.tree.structure({"head": grad_whole["head"]})
  for a, b in zip(jax.tree.leaves(grad_head), jax.tree.leaves(grad_whole["head"])):
    assert np.abs(np.asarray(b)).max() > 1e-4
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # compiles a rollout, experience and update of its own
def test_lora_policy_with_a_head_only_critic_starts_at_ratio_one_and_raises_the_reward():
  """As test_lora_ppo's test, the critic a head on the RM's trunk: the state holds the policy's
  adapters and two head leaves, the optimizer nothing else, and the planted reward rises."""
  hyper = dataclasses.replace(FROZEN, missing_eos_penalty=None)
  models = ppo.PPOModels(policy=LORA, critic=S.CFG, reward=S.CFG)
  reward = S.scalar_params(1)
  head = {"head": jax.tree.map(jnp.zeros_like, reward["head"])}  # values start at 0
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-3))
  state = S.make_state(_adapters(Transformer(LORA), 0), head, tx, optimizer="per_model")
  hyper = dataclasses.replace(hyper, optimizer="per_model")
  frozen = S.frozen(S.policy_params(0), reward)
  n_adapters = lora.count_adapters(state.params["policy"])
  assert n_adapters == len(jax.tree.leaves(state.params["policy"])) > 0
  assert len(jax.tree.leaves(state.params["critic"])) == 2
  mu = [optax.tree_utils.tree_get(state.opt_state[m], "mu") for m in ("policy", "critic")]
  assert [len(jax.tree.leaves(m)) for m in mu] == [n_adapters, 2]
  before = [np.asarray(x) for x in jax.tree.leaves(frozen)]

  sample = rollout.make_rollout_fn(LORA, N, (), S.PAD, SamplingParams(temperature=0.7))
  experience = jax.jit(functools.partial(ppo.make_experience, models=models, hyper=hyper,
                                         reward_fn=planted_reward))
  update = jax.jit(functools.partial(ppo.ppo_update, models=models, hyper=hyper,
                                     controller=CONTROLLER, tx=tx))
  tokens, mask = S.prompts(32, seed=7)
  scores = []
  for i in range(11):
    key = jax.random.fold_in(state.key(), 0)
    ro = sample({"params": lora.merge(state.params["policy"], frozen.reference)}, tokens, mask,
                key)
    exp, metrics = experience(state.params, frozen, ro, state.kl_coef)
    scores.append(float(metrics["objective/scores"]))
    new_state, stats = update(state, exp, None, frozen=frozen)
    if i == 0:
      assert abs(float(metrics["objective/kl"])) < 1e-4
      assert abs(float(np.asarray(stats["ppo/policy/ratio"])[0, 0]) - 1.0) < 1e-5
      assert float(np.asarray(stats["ppo/loss/value"])[0, 0]) > 0
    if i < 10:
      state = new_state
  for a, b in zip(before, jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, np.asarray(b))
  assert not np.allclose(np.asarray(state.params["critic"]["head"]["dense"]["kernel"]), 0.0)
  start, end = scores[0], scores[-1]
  assert start < 0.5, scores
  assert end > start + 1.0 and end > 3 * start, scores


def test_the_trainer_starts_a_head_only_critic_as_the_normalised_rm_head(tmp_path):
  """The pipeline's layout (an RM trained as LoRA on the SFT run): the critic is the RM's head
  with gain 2 and bias -0.5 folded in, and the state holds nothing else of the critic."""
  from types import SimpleNamespace
  from rlhf_jax.config import util as config_util
  from rlhf_jax.core import sharding
  from rlhf_jax.rl import trainer
  sft, rm = _shared_base_runs(tmp_path, S.V)
  config = config_util.load_config("configs/ppo.py:size=tiny,steps=2")
  with config.unlocked():
    config.sft_dir, config.rm_dir = sft, rm
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.ppo.critic_trunk = "frozen"
  hyper = trainer.hyper_from_config(config)
  assert hyper.critic_trunk == "frozen"
  models, sources = trainer.resolve_models(config, SimpleNamespace(vocab_size=S.V, path="-"))
  mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(None)
  (state, frozen), (shardings, _) = trainer.create_models(
      models, optax.adam(1e-3), CONTROLLER, sources["gain"], sources["bias"], mesh, rules, 0,
      hyper.optimizer, hyper.critic_trunk, trainer.loaded_parts(sources, models, hyper))
  frozen = trainer.load_frozen(frozen, sources, models)
  state = trainer.load_trainable(state, frozen, shardings, sources, hyper)
  trainer.check_filled(state, frozen)
  assert set(state.params["critic"]) == {"head"}
  rm_head = np.asarray(frozen.reward["head"]["dense"]["kernel"])
  np.testing.assert_allclose(np.asarray(state.params["critic"]["head"]["dense"]["kernel"]),
                             GAIN * rm_head, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state.params["critic"]["head"]["dense"]["bias"]),
                             GAIN * np.asarray(frozen.reward["head"]["dense"]["bias"]) + BIAS,
                             rtol=1e-6)


def test_an_unknown_critic_trunk_is_a_clear_error():
  with pytest.raises(ValueError, match="critic_trunk"):
    ppo.PPOHyper(critic_trunk="shared")
