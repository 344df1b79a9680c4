"""The PPO step on a tiny model: log-probs against the sampler, the first update's ratio, the
KL controller, the missing-EOS penalty, EMA and PPO-ptx against hand-computed values, and on a
planted reward (the count of one token in the answer) that the penalty acts and reward rises.

The references are independent: numpy over the sampler's own outputs, hand-computed formulas,
or a plain forward pass of the model; the step is never checked against itself."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ppo_setup as S
from rlhf_jax.models import losses
from rlhf_jax.models import Transformer
from rlhf_jax.config import util as config_util
from rlhf_jax.rl import iteration, kl, ppo
from rlhf_jax.infer import rollout
from rlhf_jax.infer.sampling import SamplingParams

TARGET = 7  # the planted reward counts this token in each answer
N = 8  # answer tokens


def planted_reward(frozen, ro):
  del frozen
  return jnp.sum((ro.answer_tokens == TARGET) * ro.answer_mask, axis=-1)


HYPER = ppo.PPOHyper(epochs=2, minibatches=2, temperature=0.7, missing_eos_penalty=None)
# Adaptive, with a horizon so long that β hardly moves over a test, yet follows the formula.
CONTROLLER = kl.KLController(init_coef=0.0, adaptive=True, target=6.0, horizon=1e4)


@pytest.fixture(scope="module")
def runner():
  return S.Runner(HYPER, CONTROLLER, lr=2e-3, max_new_tokens=N, stop_ids=(),
                  reward_fn=planted_reward)


def _start(runner, kl_coef=0.0, seed=0):
  """Policy = reference; a critic that starts at 0 (as one initialised from a normalised RM
  starts near the mean score), so early advantages are the rewards, not a random critic."""
  policy = S.policy_params(seed)
  critic = S.scalar_params(1)
  critic = {**critic, "head": jax.tree.map(jnp.zeros_like, critic["head"])}
  state = S.make_state(policy, critic, runner.tx, kl_coef=kl_coef)
  return state, S.frozen(jax.tree.map(jnp.copy, policy))


# ------------------------------------------------------------------------------ rollout layout


def test_recomputed_logprobs_equal_the_samplers_with_left_padded_prompts():
  params = S.policy_params(3)
  tokens, mask = S.prompts(6, width=7, seed=3)
  assert len(set(np.asarray(mask).sum(1))) > 2  # ragged, so left padding is exercised
  sampling = SamplingParams(temperature=0.7, top_p=0.9)  # log-probs are taken before top-p
  fn = rollout.make_rollout_fn(S.CFG, N, (S.STOP,), S.PAD, sampling)
  ro = fn({"params": params}, tokens, mask, jax.random.key(5))
  recomputed = jax.jit(functools.partial(ppo.answer_logprobs, model_config=S.CFG,
                                         temperature=0.7))(params, ro)
  m = np.asarray(ro.answer_mask) > 0
  np.testing.assert_allclose(np.asarray(recomputed)[m], np.asarray(ro.logprobs)[m],
                             atol=2e-5, rtol=0)
  # A wrong temperature is visible at this tolerance, so the comparison can fail.
  other = ppo.answer_logprobs(params, ro, model_config=S.CFG, temperature=1.0)
  assert np.abs(np.asarray(other)[m] - np.asarray(ro.logprobs)[m]).max() > 1e-2


def test_rollout_layout_positions_and_masks():
  tokens, mask = S.prompts(5, width=6, seed=4)
  fn = rollout.make_rollout_fn(S.CFG, N, tuple(range(1, 9)), S.PAD, SamplingParams())
  ro = jax.device_get(fn({"params": S.policy_params(4)}, tokens, mask, jax.random.key(1)))
  seg, pos = np.asarray(ro.segment_ids), np.asarray(ro.positions)
  for b in range(5):
    real = np.flatnonzero(seg[b])
    n_prompt, n_answer = int(np.asarray(mask)[b].sum()), int(ro.answer_mask[b].sum())
    assert len(real) == n_prompt + n_answer
    # Contiguous: left padding, then prompt, then answer, then right padding.
    assert real[0] == 6 - n_prompt and real[-1] == 6 + n_answer - 1
    np.testing.assert_array_equal(pos[b, real], np.arange(len(real)))
    np.testing.assert_array_equal(ro.tokens[b, :6], np.asarray(tokens)[b])


def test_missing_eos_is_flagged_exactly_on_answers_without_a_stop_token():
  stop_ids = (1, 2, 3, 4, 5, 6)  # frequent enough that some answers stop, some do not
  fn = rollout.make_rollout_fn(S.CFG, N, stop_ids, S.PAD, SamplingParams())
  params = S.policy_params(5)
  tokens, mask = S.prompts(16, seed=5)
  ro = fn({"params": params}, tokens, mask, jax.random.key(2))
  host = jax.device_get(ro)
  expected = []
  for row, row_mask in zip(host.answer_tokens, host.answer_mask):
    real = [int(t) for t, m in zip(row, row_mask) if m]
    expected.append(bool(real) and real[-1] in stop_ids)
  expected = np.asarray(expected)
  assert expected.any() and not expected.all()
  np.testing.assert_array_equal(host.ended, expected)

  hyper = ppo.PPOHyper(missing_eos_penalty=-1.0)
  constant = lambda frozen, r: jnp.full(r.answer_mask.shape[:1], 0.5)  # noqa: E731
  exp, metrics = jax.jit(functools.partial(ppo.make_experience, models=S.MODELS, hyper=hyper,
                                           reward_fn=constant))(
      {"policy": params, "critic": S.scalar_params(1)}, S.frozen(params), ro,
      jnp.asarray(0.0))
  np.testing.assert_array_equal(np.asarray(exp.scores), np.where(expected, 0.5, -1.0))
  np.testing.assert_allclose(float(metrics["rollout/eos_rate"]), expected.mean())
  # The score enters the reward at each answer's last token: with β = 0 and a zero critic the
  # (unwhitened) return of the first token is the score itself.
  np.testing.assert_allclose(np.asarray(exp.returns - exp.old_values)[:, 0],
                             np.where(expected, 0.5, -1.0) * 0.95 ** (host.lengths - 1) +
                             np.asarray(_td_sum(exp, host)), rtol=1e-5, atol=1e-5)


def _td_sum(exp, host):
  """Σ_t (γλ)^t (V_{t+1} − V_t) over each answer (γ = 1): the value part of A_0."""
  values = np.asarray(exp.old_values)
  out = []
  for b, length in enumerate(np.asarray(host.lengths).astype(int)):
    v = np.append(values[b, :length], 0.0)
    out.append(sum(0.95 ** t * (v[t + 1] - v[t]) for t in range(length)))
  return np.asarray(out)


# ----------------------------------------------------------------------------- first update


def test_first_minibatch_ratio_is_one_and_kl_to_reference_zero(runner):
  state, frozen = _start(runner)
  tokens, mask = S.prompts(32, seed=6)
  state, ro, exp, metrics, stats = runner.iteration(state, frozen, tokens, mask)
  m = np.asarray(ro.answer_mask) > 0
  assert abs(float(metrics["objective/kl"])) < 1e-4
  assert np.abs(np.asarray(exp.kl)).max() < 1e-4
  first = {k: np.asarray(v)[0, 0] for k, v in stats.items()}
  assert abs(first["ppo/policy/ratio"] - 1.0) < 1e-5
  assert first["ppo/policy/approxkl"] < 1e-10
  assert first["ppo/policy/clipfrac"] == 0.0
  # ...and the update moved the policy: later minibatches see ratios away from 1.
  assert np.asarray(stats["ppo/policy/approxkl"])[1, 1] > 1e-6
  # Advantages whitened over real tokens only.
  adv = np.asarray(exp.advantages)
  assert abs(adv[m].mean()) < 1e-5 and abs(adv[m].std(ddof=1) - 1.0) < 1e-4
  assert np.all(adv[~m] == 0)
  # The adaptive controller applied its formula to this batch's mean KL.
  beta = float(state.kl_coef)
  assert beta == 0.0  # β = 0 stays 0 ...
  expected = 0.3 * (1 + np.clip(float(np.mean(exp.kl)) / 6.0 - 1, -0.2, 0.2) * 32 / 1e4)
  moved, _ = runner.update_fn(S.make_state(S.policy_params(0), S.scalar_params(1), runner.tx,
                                           kl_coef=0.3), exp, None)
  np.testing.assert_allclose(float(moved.kl_coef), expected, rtol=1e-6)  # ... β > 0 moves


def test_per_language_beta_penalises_each_row_by_its_language_and_follows_its_kl(runner):
  """kl.coef_by_lang: β [L] in the state, each row's KL penalty at its language's β, and each
  β moved by the controller's formula from its own language's mean KL (numpy reference)."""
  state, frozen = _start(runner)
  tokens, mask = S.prompts(32, seed=6)
  state, *_ = runner.iteration(state, frozen, tokens, mask)  # the policy leaves the reference
  ro = runner.rollout_fn({"params": state.params["policy"]}, tokens, mask, jax.random.key(3))
  lang = np.tile(np.asarray([0, 1], np.int32), 16)  # [B]: en, zh, en, zh, ...
  betas = np.asarray([0.2, 0.5], np.float32)
  exp, metrics = runner.experience_fn(state.params, frozen, ro, jnp.asarray(betas),
                                      jnp.asarray(lang))
  row_kl = np.asarray(exp.kl)  # [B] nats, each answer's summed per-token k1
  assert np.abs(row_kl).max() > 1e-3  # a KL to penalise
  # non_score_reward is the batch mean of -β_row * KL_row.
  np.testing.assert_allclose(float(metrics["objective/non_score_reward"]),
                             np.mean(-betas[lang] * row_kl), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(float(metrics["objective/kl_coef"]), 0.35, rtol=1e-6)
  # Equal β in both languages is the one-β experience, row for row.
  same, _ = runner.experience_fn(state.params, frozen, ro, jnp.full(2, 0.3, jnp.float32),
                                 jnp.asarray(lang))
  one, _ = runner.experience_fn(state.params, frozen, ro, jnp.asarray(0.3, jnp.float32))
  np.testing.assert_allclose(np.asarray(same.advantages), np.asarray(one.advantages),
                             rtol=1e-5, atol=1e-6)
  # The update moves each language's β by the rule with that language's KL and episodes.
  moved, _ = runner.update_fn(state.replace(kl_coef=jnp.asarray(betas)), exp, None)
  for i in range(2):
    kl_i = row_kl[lang == i].mean()
    expected = betas[i] * (1 + np.clip(kl_i / 6.0 - 1, -0.2, 0.2) * 16 / 1e4)
    np.testing.assert_allclose(float(moved.kl_coef[i]), expected, rtol=1e-6)


def test_per_language_controller_keeps_a_language_absent_from_the_batch():
  c = kl.KLController(init_coef=0.1, adaptive=True, target=2.0, horizon=10.0,
                      lang_coefs=(0.1, 0.4))
  np.testing.assert_allclose(np.asarray(c.initial()), [0.1, 0.4])
  # Three English answers at KL 3 nats (error clipped to +0.2), no Chinese ones.
  out = c.update_from_rows(c.initial(), jnp.asarray([3.0, 3.0, 3.0]), jnp.asarray([0, 0, 0]))
  np.testing.assert_allclose(np.asarray(out), [0.1 * (1 + 0.2 * 3 / 10.0), 0.4], rtol=1e-6)
  with pytest.raises(ValueError, match="language index"):
    kl.row_coefs(c.initial(), None)


@pytest.mark.parametrize("text,error", [
    ("zh", "is not 'lang:beta'"), ("zh:-1", "is not 'lang:beta'"), ("zh:x", "is not 'lang:beta'"),
    ("fr:0.1", "not one of the run's languages")])
def test_coef_by_lang_errors_name_the_item(text, error):
  with pytest.raises(ValueError, match=error):
    config_util.parse_coef_by_lang(text, ("en", "zh"))


def test_coef_by_lang_orders_betas_as_the_runs_languages():
  from rlhf_jax.rl import trainer
  import ml_collections
  config = ml_collections.ConfigDict(dict(kl=dict(coef=0.07, coef_by_lang="zh:0.1",
                                                  adaptive=True, target=3.0, horizon=500.0)))
  assert trainer.controller_from_config(config, ("en", "zh")).lang_coefs == (0.07, 0.1)
  assert trainer.controller_from_config(config, ("zh",)).lang_coefs == (0.1,)
  config.kl.coef_by_lang = ""
  assert trainer.controller_from_config(config, ("en", "zh")).lang_coefs == ()
  # Each global row's language index, from the batch's local languages.
  np.testing.assert_array_equal(iteration.row_lang_index(["zh", "en", "zh"], ("en", "zh")),
                                [1, 0, 1] * jax.process_count())
  with pytest.raises(ValueError, match="not one of the run's languages"):
    iteration.row_lang_index(["fr"], ("en", "zh"))


def test_nonfinite_minibatches_are_skipped_and_counted(runner):
  """A minibatch whose loss or gradient is not finite changes nothing and is counted."""
  state, frozen = _start(runner)
  tokens, mask = S.prompts(32, seed=6)
  _, _, exp, _, _ = runner.iteration(state, frozen, tokens, mask)
  poisoned = exp._replace(advantages=exp.advantages.at[3].set(jnp.nan))  # one episode
  new, stats = runner.update_fn(state, poisoned, None)
  finite = np.asarray(stats["finite"])  # [epochs, minibatches]
  assert (~finite).sum(axis=1).tolist() == [1] * HYPER.epochs  # its minibatch, every epoch
  assert iteration.summarize_update(stats)["ppo/skipped_updates"] == HYPER.epochs
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(new.params))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params),
                                                       jax.tree.leaves(state.params)))
  all_nan = exp._replace(advantages=jnp.full_like(exp.advantages, jnp.nan))
  same, stats = runner.update_fn(state, all_nan, None)
  assert not np.asarray(stats["finite"]).any()
  for a, b in zip(jax.tree.leaves((same.params, same.opt_state)),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)


def test_adaptive_controller_hand_computed_steps():
  c = kl.KLController(init_coef=0.1, adaptive=True, target=6.0, horizon=10000.0)
  beta = 0.1
  beta = c.update(beta, 9.0, 64)  # KL/target − 1 = 0.5, clipped to 0.2
  assert beta == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
  beta2 = c.update(beta, 6.6, 64)  # 0.1, inside the clip
  assert beta2 == pytest.approx(beta * (1 + 0.1 * 64 / 10000))
  beta3 = c.update(beta2, 0.0, 128)  # −1 clipped to −0.2
  assert beta3 == pytest.approx(beta2 * (1 - 0.2 * 128 / 10000))
  fixed = kl.KLController(init_coef=0.1)
  assert fixed.update(0.1, 100.0, 64) == 0.1
  # Inside jit on arrays: the same numbers.
  assert float(jax.jit(c.update)(jnp.float32(0.1), jnp.float32(9.0), 64)) == pytest.approx(
      0.1 * (1 + 0.2 * 64 / 10000), rel=1e-6)


def test_kl_estimators():
  logp = jnp.log(jnp.asarray([0.5, 0.2, 0.9]))
  ref = jnp.log(jnp.asarray([0.25, 0.4, 0.9]))
  np.testing.assert_allclose(kl.kl_k1(logp, ref), np.log([2.0, 0.5, 1.0]), atol=1e-6)
  r = np.log([0.5, 2.0, 1.0])
  np.testing.assert_allclose(kl.kl_k3(logp, ref), np.exp(r) - 1 - r, atol=1e-6)
  assert np.all(np.asarray(kl.kl_k3(logp, ref)) >= 0)


# ----------------------------------------------------------------------- the penalty, the reward


def _train(runner, kl_coef, iterations=10, seed=0):
  """objective/* of each iteration, and of one more rollout from the final policy."""
  state, frozen = _start(runner, kl_coef=kl_coef, seed=seed)
  tokens, mask = S.prompts(32, seed=7)
  history = []
  for i in range(iterations + 1):
    rollout_only = i == iterations
    new_state, _, _, metrics, _ = runner.iteration(state, frozen, tokens, mask)
    history.append({"score": float(metrics["objective/scores"]),
                    "kl": float(metrics["objective/kl"])})
    if not rollout_only:
      state = new_state
  return history


@pytest.fixture(scope="module")
def free_run(runner):
  return _train(runner, kl_coef=0.0)


def test_planted_reward_rises_within_a_few_iterations(free_run):
  start, end = free_run[0]["score"], free_run[-1]["score"]
  # A near-uniform policy over 64 tokens emits the target ~N/64 = 0.125 times per answer.
  assert start < 0.5, free_run
  assert end > start + 1.0 and end > 3 * start, free_run


def test_large_beta_keeps_kl_near_zero_while_zero_beta_moves(runner, free_run):
  held = _train(runner, kl_coef=3.0)
  assert free_run[-1]["kl"] > 4.0, free_run
  assert max(h["kl"] for h in held) < 2.5, held
  assert held[-1]["kl"] < 0.25 * free_run[-1]["kl"], (held, free_run)
  assert held[-1]["score"] < free_run[-1]["score"]


# ------------------------------------------------------------------------------ EMA and ptx


@pytest.mark.heavy  # an iteration compiled for EMA and ptx alone (30 s cold): make test-all
@pytest.mark.slow  # compiles an update of its own
def test_ema_and_ptx_terms():
  hyper = ppo.PPOHyper(epochs=1, minibatches=1, temperature=0.7, missing_eos_penalty=None,
                       ema_decay=0.75, ptx_coef=0.5)
  r = S.Runner(hyper, kl.KLController(), lr=1e-2, max_new_tokens=N, stop_ids=(),
               reward_fn=planted_reward)
  policy = S.policy_params(8)
  state = S.make_state(policy, S.scalar_params(1), r.tx, ema=True)
  rng = np.random.RandomState(0)
  ids = rng.randint(2, S.V, size=(4, 12)).astype(np.int32)
  ptx = {"inputs": ids[:, :-1], "targets": ids[:, 1:],
         "positions": np.tile(np.arange(11, dtype=np.int32), (4, 1)),
         "segment_ids": np.ones((4, 11), np.int32), "loss_mask": np.ones((4, 11), np.float32)}
  ptx_m = jax.tree.map(lambda x: jnp.asarray(x)[None], ptx)  # [minibatches=1, rows, T]
  tokens, mask = S.prompts(8, seed=8)
  new_state, _, _, _, stats = r.iteration(state, S.frozen(policy), tokens, mask, ptx_m)

  # PPO-ptx: the mean next-token NLL of the batch under the policy before the update.
  logits, _ = Transformer(S.CFG).apply({"params": policy}, ptx["inputs"], ptx["positions"],
                                       ptx["segment_ids"])
  logits = np.asarray(logits, np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - np.take_along_axis(logits, ptx["targets"][..., None], -1)[..., 0]
  first = {k: float(np.asarray(v)[0, 0]) for k, v in stats.items()}
  np.testing.assert_allclose(first["ppo/loss/ptx"], nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(
      first["ppo/loss/total"],
      first["ppo/loss/policy"] + 0.1 * first["ppo/loss/value"] + 0.5 * nll.mean(), rtol=1e-5)

  # EMA after one update: 0.75 · old + 0.25 · new.
  expected = jax.tree.map(lambda old, new: 0.75 * old + 0.25 * new, policy,
                          new_state.params["policy"])
  for a, b in zip(jax.tree.leaves(new_state.ema), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(new_state.ema)[0], jax.tree.leaves(policy)[0])


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,value,match", [
    ("clip_eps", 0.0, "clip_eps"), ("clip_eps", 1.5, "clip_eps"),
    ("value_clip", -0.1, "value_clip"), ("value_clip", 1.0, "value_clip"),
    ("kl_estimator", "k2", "kl_estimator"), ("ema_decay", 1.0, "ema_decay")])
def test_bad_hyperparameters_are_clear_errors(field, value, match):
  with pytest.raises(ValueError, match=match):
    ppo.PPOHyper(**{field: value})


def test_negative_beta_is_an_error():
  with pytest.raises(ValueError, match="beta must be >= 0"):
    kl.KLController(init_coef=-0.01)


def test_minibatches_must_divide_the_batch():
  with pytest.raises(ValueError, match="does not divide the batch of 10"):
    ppo.PPOHyper(minibatches=4).check_batch(10)
  ppo.PPOHyper(minibatches=4).check_batch(12)


def test_policy_and_value_losses_against_formulas():
  rng = np.random.RandomState(9)
  logp, old, adv = (rng.normal(size=(3, 5)).astype(np.float32) * s for s in (0.3, 0.3, 1.0))
  mask = np.ones((3, 5), np.float32)
  mask[1, 3:] = 0
  loss, stats = losses.ppo_policy_loss(logp, old, adv, mask, 0.2)
  ratio = np.exp(logp - old)
  per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
  np.testing.assert_allclose(float(loss), per[mask > 0].mean(), rtol=1e-5)
  clipped = (-adv * np.clip(ratio, 0.8, 1.2)) > (-adv * ratio)
  np.testing.assert_allclose(float(stats["clipfrac"]), clipped[mask > 0].mean(), rtol=1e-6)
  v, v_old, ret = (rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3))
  vloss, _ = losses.ppo_value_loss(v, v_old, ret, mask, 0.2)
  vc = v_old + np.clip(v - v_old, -0.2, 0.2)
  ref = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)[mask > 0].mean()
  np.testing.assert_allclose(float(vloss), ref, rtol=1e-5)


def test_answer_mean_weighs_every_answer_the_same():
  """loss_mean="answer": each answer's surrogate averaged over its own tokens, then over the
  answers with any token (a Python loop); with answers of unequal length it differs from the
  token mean, and an answer without tokens counts for nothing."""
  rng = np.random.RandomState(4)
  logp, old, adv = (rng.normal(size=(4, 6)).astype(np.float32) * s for s in (0.3, 0.3, 1.0))
  mask = np.ones((4, 6), np.float32)
  mask[0, 2:] = 0  # 2 tokens
  mask[2, 5:] = 0  # 5 tokens
  mask[3] = 0  # no answer (a padded row)
  ratio = np.exp(logp - old)
  per = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))
  want = np.mean([per[b][mask[b] > 0].mean() for b in range(3)])
  got, stats = losses.ppo_policy_loss(logp, old, adv, mask, 0.2, "answer")
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  token, token_stats = losses.ppo_policy_loss(logp, old, adv, mask, 0.2)
  assert abs(float(token) - want) > 1e-3  # the two means differ on these rows
  for key in token_stats:  # the stats stay token means
    assert float(stats[key]) == pytest.approx(float(token_stats[key])), key
  with pytest.raises(ValueError, match="loss_mean must be one of"):
    ppo.PPOHyper(loss_mean="row")
  from rlhf_jax.config import util as config_util
  from rlhf_jax.rl import trainer
  config = config_util.load_config("configs/ppo.py:size=tiny,steps=2")
  assert trainer.hyper_from_config(config).loss_mean == "token"  # TRL's, the default
  with config.unlocked():
    config.ppo.loss_mean = "answer"
  assert trainer.hyper_from_config(config).loss_mean == "answer"


def test_gradients_one_model_after_the_other_equal_the_whole_losses():
  """ppo_grads (the policy's backward, then the critic's) against jax.grad of the
  whole minibatch loss, with the entropy bonus and the ptx term on: the same loss, stats and
  gradients, since the two terms share no trained parameter."""
  hyper = ppo.PPOHyper(temperature=0.7, ent_coef=0.01, ptx_coef=0.5, vf_coef=0.3)
  params = {"policy": S.policy_params(0), "critic": S.scalar_params(1)}
  exp, ptx = S.minibatch_with_ptx(params["policy"])
  (loss, stats), grads = jax.jit(functools.partial(
      ppo.ppo_grads, models=S.MODELS, hyper=hyper))(params, exp, ptx)
  (ref_loss, ref_stats), ref_grads = jax.jit(jax.value_and_grad(
      lambda p: ppo.ppo_loss(p, exp, ptx, models=S.MODELS, hyper=hyper), has_aux=True))(params)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  assert sorted(stats) == sorted(ref_stats)
  for key in stats:
    np.testing.assert_allclose(float(stats[key]), float(ref_stats[key]), rtol=1e-6, atol=1e-7)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    scale = float(np.max(np.abs(r))) + 1e-12
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert float(optax.global_norm(grads["critic"])) > 0
  assert float(optax.global_norm(grads["policy"])) > 0


def _relative_step_error(got, want, start) -> float:
  """|(got − start) − (want − start)| / |want − start| over every leaf: how far one optimizer
  step is from a reference step, relative to the step's size."""
  diff = optax.global_norm(jax.tree.map(jnp.subtract, got, want))
  return float(diff / optax.global_norm(jax.tree.map(jnp.subtract, want, start)))


def test_optimizer_per_model_steps_each_model_on_its_own_clipped_gradient():
  """optimizer="per_model" (the policy's update, then the critic's) against a reference built
  from the whole minibatch loss: jax.grad of `ppo_loss`, each model's gradient given to its
  own copy of the optimizer. One epoch of one minibatch (every row, shuffled: the losses are
  row means). The clip is tight enough to act, so the joint update (one clip over both
  gradients) lands elsewhere: the test fails if the two were confused."""
  # vf_coef: a critic gradient as large as the policy's, so a joint clip scales both by much
  # less than each model's own. SGD: Adam's first step (about lr·sign(g)) would hide the clip.
  hyper = ppo.PPOHyper(temperature=0.7, minibatches=1, epochs=1, optimizer="per_model",
                       vf_coef=5.0)
  tx = optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(1.0))
  params = {"policy": S.policy_params(0), "critic": S.scalar_params(1)}
  exp, _ = S.minibatch_with_ptx(params["policy"])
  keys = jax.random.split(jax.random.key(0), 1)
  opt_state = ppo.init_opt_state(tx, params, "per_model")
  assert set(opt_state) == {"policy", "critic"}
  (new_params, new_opt, _), stats = jax.jit(functools.partial(
      ppo.update_models_apart, models=S.MODELS, hyper=hyper, tx=tx))(
          params, opt_state, None, exp, None, keys)

  # Jitted: run eagerly, the model's backward dispatched op by op took ~40 s of this test.
  grads = jax.jit(jax.grad(lambda p, e: ppo.ppo_loss(p, e, None, models=S.MODELS,
                                                      hyper=hyper)[0]))(params, exp)
  for name in ("policy", "critic"):
    updates, _ = tx.update(grads[name], tx.init(params[name]), params[name])
    want = optax.apply_updates(params[name], updates)
    assert _relative_step_error(new_params[name], want, params[name]) < 1e-4, name
  assert stats["finite"].shape == (1, 1) and bool(stats["finite"][0, 0])
  np.testing.assert_allclose(float(stats["ppo/grad_norm"][0, 0]),
                             float(optax.global_norm(grads)), rtol=1e-5)

  (joint, _, _), _ = jax.jit(functools.partial(
      ppo.update_jointly, models=S.MODELS, hyper=hyper, tx=tx))(
          params, tx.init(params), None, exp, None, keys)
  assert _relative_step_error(joint["policy"], new_params["policy"], params["policy"]) > 0.05


def test_ppo_update_with_an_optimizer_per_model_keeps_a_state_per_model():
  """ppo_update with optimizer="per_model" and the trainer's Adam, 2 epochs x 2 minibatches,
  from a state built by init_opt_state: each model's Adam count advances once per minibatch,
  every step is applied, and the stats have the joint update's keys and [epochs, minibatches]
  shapes (the trainer's metrics read either)."""
  hyper = ppo.PPOHyper(temperature=0.7, minibatches=2, epochs=2, optimizer="per_model")
  runner = S.Runner(hyper)
  params = {"policy": S.policy_params(0), "critic": S.scalar_params(1)}
  state = S.make_state(params["policy"], params["critic"], runner.tx, optimizer="per_model")
  exp, _ = S.minibatch_with_ptx(params["policy"])
  new_state, stats = runner.update_fn(state, exp, None)
  for name in ("policy", "critic"):
    assert int(optax.tree_utils.tree_get(new_state.opt_state[name], "count")) == 4
    moved = optax.global_norm(jax.tree.map(jnp.subtract, new_state.params[name], params[name]))
    assert float(moved) > 0, name
  assert bool(np.all(stats["finite"]))
  joint_state = S.make_state(params["policy"], params["critic"], runner.tx)
  _, joint_stats = S.Runner(dataclasses.replace(hyper, optimizer="joint")).update_fn(
      joint_state, exp, None)
  assert sorted(stats) == sorted(joint_stats)
  assert all(v.shape[:2] == (2, 2) for v in stats.values())
