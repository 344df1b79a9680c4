"""KTO and DPO: the losses against numpy, the answer log-probs against a loop over positions,
the data (thumbs, pairs from thumbs and from grades), bad input, and short end-to-end runs from
a stand-in SFT checkpoint that must move the implicit reward the right way on their data."""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.config import util as config_util
from rlhf_jax.train import launch
from rlhf_jax.models import losses
from rlhf_jax.infer import logprobs as logprobs_lib
from rlhf_jax.data import builders
from rlhf_jax.core.metrics import read_metrics
from rlhf_jax.models import ModelConfig, Transformer
from rlhf_jax.eval import held_out
from rlhf_jax.train import objective as objective_lib
from rlhf_jax.train import preference as pref
from rlhf_jax.data import preference_batches as pref_inputs


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
  return np.log1p(np.exp(x))


# ---------------------------------------------------------------------------------------------
# Losses against numpy.


def kto_reference(pol, ref, kl_pol, kl_ref, labels, mask, kl_mask, beta, wd, wu):
  """KTO written out row by row (REFERENCE.md): z = β·max(0, mean mismatched log-ratio)."""
  pairs = [kl_pol[i] - kl_ref[i] for i in range(len(mask)) if kl_mask[i]]
  z = beta * max(0.0, sum(pairs) / len(pairs)) if pairs else 0.0
  total, n = 0.0, 0
  for i in range(len(mask)):
    if not mask[i]:
      continue
    r = beta * (pol[i] - ref[i])
    if labels[i] == 1:
      total += wd * (1.0 - _sigmoid(r - z))
    else:
      total += wu * (1.0 - _sigmoid(z - r))
    n += 1
  return total / n, z / beta


@pytest.mark.parametrize("kl_shift", [0.3, -2.0])  # the KL estimate above 0, and clamped at 0
def test_kto_loss_equals_numpy(kl_shift):
  rng = np.random.default_rng(0)
  b = 10
  pol, ref, kl_ref = (rng.normal(-20, 3, b) for _ in range(3))
  kl_pol = kl_ref + kl_shift + rng.normal(0, 0.1, b)
  labels = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 0])
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], np.float32)  # two padded rows
  kl_mask = mask * np.roll(mask, -1)
  beta, wd, wu = 0.1, 1.0, 3.0
  loss, metrics = losses.kto_loss(pol, ref, kl_pol, kl_ref, labels, mask, beta=beta,
                                  desirable_weight=wd, undesirable_weight=wu, kl_mask=kl_mask)
  want, kl = kto_reference(pol, ref, kl_pol, kl_ref, labels, mask, kl_mask, beta, wd, wu)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5, atol=1e-7)
  if kl_shift < 0:
    assert float(metrics["kl"]) == 0.0
  rewards = beta * (pol - ref)
  liked, disliked = (labels == 1) & (mask > 0), (labels == 0) & (mask > 0)
  np.testing.assert_allclose(float(metrics["rewards/chosen"]), rewards[liked].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/rejected"]), rewards[disliked].mean(),
                             rtol=1e-5)
  assert (float(metrics["liked"]), float(metrics["disliked"])) == (liked.sum(), disliked.sum())


def test_kto_gradient_skips_the_reference_point_and_padding():
  rng = np.random.default_rng(1)
  b = 6
  pol, ref, kl_ref = (rng.normal(-10, 2, b).astype(np.float32) for _ in range(3))
  kl_pol = kl_ref + 1.5
  labels = np.array([1, 0, 1, 0, 1, 1], np.float32)
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
  beta, wd, wu = 0.5, 1.0, 2.0

  def loss_of(p, kp):
    return losses.kto_loss(p, ref, kp, kl_ref, labels, mask, beta=beta, desirable_weight=wd,
                           undesirable_weight=wu)[0]

  g_pol, g_kl = jax.grad(loss_of, argnums=(0, 1))(pol, kl_pol)
  np.testing.assert_array_equal(np.asarray(g_kl), 0.0)  # z is a constant to the optimiser
  # By hand, with z fixed: d/dr w(1 − σ(r − z)) = −w σ'(r − z) for a like, and
  # d/dr w(1 − σ(z − r)) = +w σ'(z − r) for a dislike; r = β(π − π_ref), mean over 5 rows.
  z = beta * max(0.0, float(np.mean((kl_pol - kl_ref)[:5])))
  r = beta * (pol - ref)
  s = _sigmoid(r - z)
  dsig = s * (1 - s)  # σ'(x) = σ'(−x)
  want = np.where(labels == 1, -wd * dsig, wu * dsig) * beta / 5.0 * mask
  np.testing.assert_allclose(np.asarray(g_pol), want, rtol=1e-5, atol=1e-8)
  assert g_pol[0] < 0 < g_pol[1]  # descent raises a liked answer's log-prob, lowers a disliked
  assert g_pol[5] == 0.0


def test_kto_weights_scale_their_own_rows_only():
  """loss(λ_D, λ_U) = (λ_D·L + λ_U·D) / n with L, D the liked and disliked sums of (1 − v)."""
  rng = np.random.default_rng(2)
  pol, ref, kl_pol, kl_ref = (rng.normal(-5, 1, 6) for _ in range(4))
  labels, mask = np.array([1, 1, 0, 0, 1, 0]), np.ones(6)

  def loss(wd, wu):
    return float(losses.kto_loss(pol, ref, kl_pol, kl_ref, labels, mask, beta=0.1,
                                 desirable_weight=wd, undesirable_weight=wu)[0])

  liked_part = loss(2.0, 1.0) - loss(1.0, 1.0)  # L / n
  disliked_part = (loss(1.0, 4.0) - loss(1.0, 1.0)) / 3.0  # D / n
  np.testing.assert_allclose(liked_part + disliked_part, loss(1.0, 1.0), rtol=1e-5)
  z = 0.1 * max(0.0, float(np.mean(kl_pol - kl_ref)))
  r = 0.1 * (pol - ref)
  np.testing.assert_allclose(liked_part, np.sum((1 - _sigmoid(r - z))[labels == 1]) / 6,
                             rtol=1e-5)


def test_dpo_loss_equals_numpy():
  rng = np.random.default_rng(3)
  b = 7
  pc, pr, rc, rr = (rng.normal(-15, 3, b) for _ in range(4))
  mask = np.array([1, 1, 1, 1, 1, 0, 0], np.float32)
  beta, eps = 0.2, 0.1
  loss, metrics = losses.dpo_loss(pc, pr, rc, rr, mask, beta=beta, label_smoothing=eps)
  logits = beta * ((pc - rc) - (pr - rr))
  per = (1 - eps) * _softplus(-logits) + eps * _softplus(logits)
  np.testing.assert_allclose(float(loss), per[:5].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(logits[:5] > 0), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["rewards/margin"]), logits[:5].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["rewards/chosen"]), beta * (pc - rc)[:5].mean(),
                             rtol=1e-5)
  assert float(metrics["pairs"]) == 5


def test_dpo_with_policy_equal_to_reference():
  rng = np.random.default_rng(4)
  chosen, rejected = rng.normal(-12, 2, 5), rng.normal(-12, 2, 5)
  beta = 0.1

  def loss_of(pc, pr):
    return losses.dpo_loss(pc, pr, chosen, rejected, jnp.ones(5), beta=beta)[0]

  loss = loss_of(chosen, rejected)
  np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-6)
  g_chosen, g_rejected = jax.grad(loss_of, argnums=(0, 1))(chosen, rejected)
  # d/dπ_c of softplus(−β(π_c − π_r + ...)) at logits 0 = −β σ(0) / n = −β / (2n).
  np.testing.assert_allclose(np.asarray(g_chosen), -beta / 10, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_rejected), beta / 10, rtol=1e-6)


def test_preferred_rate_equals_pair_loop():
  rng = np.random.default_rng(5)
  w, l = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 13).astype(float)  # ties
  want = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in w for b in l])
  assert held_out.preferred_rate(w, l) == pytest.approx(want)
  assert math.isnan(held_out.preferred_rate(w, []))


# ---------------------------------------------------------------------------------------------
# Answer log-probs.

TINY = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                   max_len=32)


def _tiny_params(seed=0):
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(jax.jit(Transformer(TINY).init)(jax.random.key(seed), tokens, tokens,
                                                  jnp.ones_like(tokens))["params"])


def test_sequence_logprobs_equal_a_loop_over_positions():
  params = _tiny_params()
  rng = np.random.default_rng(6)
  p_len, a_len = 12, 8
  # Every row is 16 real tokens (one compiled shape for the loop), padded differently.
  prompts = [rng.integers(3, 64, n).astype(np.int32) for n in (12, 8, 10)]
  answers = [rng.integers(3, 64, n).astype(np.int32) for n in (4, 8, 6)]
  rows = logprobs_lib.layout_rows(prompts, answers, max_prompt_len=p_len, max_answer_len=a_len,
                                  pad_id=0, n_rows=4)
  fn = jax.jit(functools.partial(logprobs_lib.sequence_logprobs, model_config=TINY))
  got = np.asarray(fn(params, *logprobs_lib.row_args(rows)))
  apply = jax.jit(Transformer(TINY).apply)
  for i, (prompt, answer) in enumerate(zip(prompts, answers)):
    seq = np.concatenate([prompt, answer])[None]  # unpadded, positions 0..L-1
    logits, _ = apply({"params": params}, seq, np.arange(seq.shape[1])[None],
                      np.ones_like(seq))
    logits = np.asarray(logits[0], np.float64)
    want = 0.0
    for t in range(len(answer)):
      pos = len(prompt) + t  # the token at pos is predicted by the output at pos - 1
      row = logits[pos - 1]
      want += row[seq[0, pos]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
    np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-4)
  assert got[3] == 0.0  # an all-padding row


def test_mismatched_rows_pair_each_prompt_with_the_next_answer():
  rng = np.random.default_rng(7)
  prompts = [rng.integers(3, 64, n).astype(np.int32) for n in (3, 6, 2)]
  answers = [rng.integers(3, 64, n).astype(np.int32) for n in (4, 2, 5)]
  kw = dict(max_prompt_len=6, max_answer_len=5, pad_id=0)
  rows = logprobs_lib.layout_rows(prompts, answers, **kw)
  got = logprobs_lib.mismatched_rows({k: jnp.asarray(v) for k, v in rows.items()}, 5)
  want = logprobs_lib.layout_rows(prompts, answers[1:] + answers[:1], **kw)
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)


def test_encode_prompt_answer_is_the_chat_template(bundled_tokenizer):
  from rlhf_jax.text import tokenizer as tok_lib
  tok = tok_lib.Tokenizer.load(bundled_tokenizer)
  prompt, answer = "How was your weekend?", "Great, I went hiking."
  p, a, cut = logprobs_lib.encode_prompt_answer(tok, prompt, answer, max_prompt_len=64,
                                                max_answer_len=64)
  np.testing.assert_array_equal(p, tok.render_prompt([{"role": "user", "content": prompt}]))
  np.testing.assert_array_equal(a, tok.encode(answer) + [tok.end_id])
  assert not cut
  p2, a2, cut2 = logprobs_lib.encode_prompt_answer(tok, prompt, answer, max_prompt_len=4,
                                                   max_answer_len=3)
  assert cut2
  np.testing.assert_array_equal(p2, np.concatenate([p[:1], p[-3:]]))  # BOS + the newest tokens
  np.testing.assert_array_equal(a2, a[:3])


# ---------------------------------------------------------------------------------------------
# Data.

LIKED = ["That sounds wonderful, tell me more!", "I love that idea, thank you so much.",
         "What a lovely thing to hear, thanks!", "Great question, happy to help you."]
DISLIKED = ["No.", "whatever lol", "I do not care about that at all.", "idk go away"]
PROMPTS = ["How was your day?", "Any plans for the weekend?", "What do you do for fun?",
           "Do you like music?", "What's your favourite food?", "Have you been abroad?",
           "Are you a morning person?", "What are you reading?"]


def feedback_records(n_liked=16, n_disliked=8):
  """Thumbs where likes are friendly and dislikes curt: learnable from a few steps."""
  out = []
  for i in range(n_liked):
    out.append({"id": f"l{i}", "prompt": PROMPTS[i % len(PROMPTS)],
                "response": LIKED[i % len(LIKED)], "label": 1, "lang": "en"})
  for i in range(n_disliked):
    out.append({"id": f"d{i}", "prompt": PROMPTS[(i + 3) % len(PROMPTS)],
                "response": DISLIKED[i % len(DISLIKED)], "label": 0, "lang": "en"})
  return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("pref_tfds"))
  train_only = (1.0, 0.0, 0.0)
  builders.write_records("rlhf_feedback", feedback_records(), config="mini", data_dir=root,
                         fractions=train_only)
  builders.write_records("rlhf_feedback", feedback_records(4, 0), config="likes",
                         data_dir=root, fractions=train_only)
  comparisons = [{"id": f"c{i}", "prompt": PROMPTS[i % len(PROMPTS)],
                  "responses": [LIKED[i % 4], DISLIKED[i % 4], LIKED[(i + 1) % 4]],
                  "grades": [0, 2, 0], "lang": "en"} for i in range(8)]
  builders.write_comparisons(comparisons, config="mini", data_dir=root, fractions=train_only)
  return root


def test_dpo_pairs_from_grades_and_from_thumbs(data_dir):
  data = pref_inputs.PreferenceData("dpo", "rlhf_comparisons/mini+rlhf_feedback/mini", "train",
                                    data_dir)
  # Grades (0, 2, 0): answers 0 and 2 each beat answer 1; the tie gives no pair.
  assert data.counts["rlhf_comparisons/mini"] == {"pairs": 16, "identical_pairs": 0}
  # Thumbs: likes of prompt k (k = i % 8) against dislikes of prompt k (k = (j + 3) % 8).
  liked = {k: sum(1 for i in range(16) if i % 8 == k) for k in range(8)}
  disliked = {k: sum(1 for j in range(8) if (j + 3) % 8 == k) for k in range(8)}
  assert data.counts["rlhf_feedback/mini"]["pairs"] == sum(liked[k] * disliked[k]
                                                           for k in range(8))
  for record, (w, l) in data.records():
    assert record["responses"][w] in LIKED and record["responses"][l] in DISLIKED


def test_kto_needs_likes_and_dislikes(data_dir):
  data = pref_inputs.PreferenceData("kto", "rlhf_feedback/likes", "train", data_dir)
  with pytest.raises(pref_inputs.NoFeedbackError, match=r"4 likes and 0 dislikes"):
    data.check_feedback()
  mixed = pref_inputs.PreferenceData("kto", "rlhf_feedback/likes+rlhf_feedback/mini", "train",
                                     data_dir)
  assert mixed.label_counts() == (20, 8)
  with pytest.raises(ValueError, match=r"KTO reads rlhf_feedback"):
    pref_inputs.PreferenceData("kto", "rlhf_comparisons/mini", "train", data_dir)


def test_bundled_feedback_weights(bundled_data_dir):
  """The real ratings: about 90% likes, so λ_U comes out near 10 and the ratio in [1, 4/3]."""
  data = pref_inputs.PreferenceData("kto", "rlhf_feedback", "train", bundled_data_dir)
  liked, disliked = data.label_counts()
  assert liked / (liked + disliked) > 0.85
  config = config_util.load_config("configs/kto.py:size=tiny")
  objective = objective_lib.objective_from_config(config, (liked, disliked))
  ratio = liked * objective.desirable_weight / (disliked * objective.undesirable_weight)
  assert 1.0 <= ratio <= 4.0 / 3.0
  assert objective.undesirable_weight > 5.0


# ---------------------------------------------------------------------------------------------
# Runs.


def save_policy(directory, model_config, seed=1, zeros=False):
  """A stand-in SFT (or PPO) checkpoint saved as `params`: random weights (norm scales 1,
  std 0.1 elsewhere, the embedding std 1), drawn in numpy -- only shapes come from the model,
  so nothing is compiled. zeros: all zeros, when only the shapes matter."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(lambda: Transformer(model_config).init(
      jax.random.key(0), tokens, tokens, jnp.ones_like(tokens))["params"]))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if zeros:
      return np.zeros(leaf.shape, leaf.dtype)
    if "scale" in name:
      return np.ones(leaf.shape, leaf.dtype)
    std = 1.0 if "embed" in name else 0.1
    return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  ckpt.save(1, params, {"step": np.ones((), np.int32)}, {}, {})
  ckpt.close()
  return params


def run_config(kind, data, data_dir, tokenizer, init_from, steps=8, batch=8, **overrides):
  config = config_util.load_config(
      f"configs/{kind}.py:size=tiny,steps={steps},seq_len=48,data={data},init_from={init_from}")
  with config.unlocked():
    config.data.data_dir = data_dir
    config.data.batch_size = batch
    config.tokenizer.path = tokenizer
    config.eval.split = "train"  # the check is that the data itself moved the model
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 1
    config.train.log_every = 1
    for key, value in overrides.items():
      section, name = key.split(".")
      config[section][name] = value
  return config


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("sft") / "checkpoints")
  config = config_util.load_config("configs/kto.py:size=tiny")
  save_policy(directory, pref.lm_trainer.build_model(config, 2048).config)
  return directory


def logged_losses(workdir, key):
  """The loss of every step, each computed before that step's update."""
  return [m[key] for m in read_metrics(workdir) if key in m]


@pytest.mark.slow
def test_kto_run_prefers_liked_answers(tmp_path, data_dir, bundled_tokenizer, sft_dir):
  # One batch holds the whole data (16 likes, 8 dislikes): every step sees the same elements.
  config = run_config("kto", "rlhf_feedback/mini", data_dir, bundled_tokenizer, sft_dir,
                      batch=24)
  workdir = str(tmp_path / "kto")
  metrics = launch.run(config, workdir)
  # λ_U from the counts: 16 likes, 8 dislikes -> λ_U = 2 (ratio 1).
  assert metrics["kto/undesirable_weight"] == pytest.approx(2.0)
  # Before: the implicit reward is 0 for every answer (policy = reference), a coin toss.
  assert metrics["eval/kto/initial/liked_over_disliked"] == 0.5
  assert metrics["eval/kto/initial/reward_liked"] == 0.0
  # After: every liked training answer's implicit reward above every disliked one's.
  assert metrics["eval/kto/liked_over_disliked"] > 0.95, metrics
  assert metrics["eval/kto/reward_liked"] > 0 > metrics["eval/kto/reward_disliked"]
  loss = logged_losses(workdir, "kto/loss")
  # Step 1 runs at policy = reference, every v = σ(0) = ½: loss = (16·1 + 8·2)·½ / 24.
  assert loss[0] == pytest.approx((16 + 16) * 0.5 / 24, rel=1e-5)
  assert len(loss) == 8 and loss[-1] < loss[0] - 0.1, loss
  logged = read_metrics(workdir)
  assert logged[0]["step"] == 0 and "eval/kto/logp_liked_over_disliked" in logged[0]
  assert logged[-1]["step"] == 8 and "eval/kto/liked_over_disliked" in logged[-1]
  assert {"kto/kl", "kto/rewards/chosen", "kto/rewards/rejected"} <= set().union(*logged)


@pytest.mark.slow
def test_dpo_run_prefers_chosen_answers(tmp_path, data_dir, bundled_tokenizer, sft_dir):
  # 8 comparisons graded (good, poor, good): 16 pairs, all in one batch.
  config = run_config("dpo", "rlhf_comparisons/mini", data_dir, bundled_tokenizer, sft_dir,
                      batch=16)
  workdir = str(tmp_path / "dpo")
  metrics = launch.run(config, workdir)
  assert metrics["eval/dpo/initial/accuracy"] == 0.5  # all implicit rewards 0: ties
  assert metrics["eval/dpo/pairs"] == 16
  assert metrics["eval/dpo/accuracy"] > 0.95, metrics
  loss = logged_losses(workdir, "dpo/loss")
  assert loss[0] == pytest.approx(math.log(2.0), rel=1e-5)
  assert loss[-1] < loss[0] - 0.1, loss


# ---------------------------------------------------------------------------------------------
# Bad input and where the policy starts.


@pytest.mark.parametrize("override,match", [
    ({"kto.beta": 0.0}, r"beta must be > 0"),
    ({"kto.desirable_weight": -1.0}, r"desirable_weight must be > 0"),
    ({"kto.auto_undesirable_weight": False, "kto.undesirable_weight": 0.0},
     r"undesirable_weight must be > 0"),
])
def test_bad_kto_settings_are_errors(tmp_path, data_dir, bundled_tokenizer, override, match):
  config = run_config("kto", "rlhf_feedback/mini", data_dir, bundled_tokenizer, "", **override)
  with pytest.raises(ValueError, match=match):
    launch.run(config, str(tmp_path))


def test_bad_dpo_beta_and_feedback_without_dislikes(tmp_path, data_dir, bundled_tokenizer):
  config = run_config("dpo", "rlhf_comparisons/mini", data_dir, bundled_tokenizer, "",
                      **{"dpo.beta": -0.1})
  with pytest.raises(ValueError, match=r"dpo.beta must be > 0"):
    launch.run(config, str(tmp_path / "a"))
  config = run_config("kto", "rlhf_feedback/likes", data_dir, bundled_tokenizer, "")
  with pytest.raises(pref_inputs.NoFeedbackError, match=r"0 dislikes"):
    launch.run(config, str(tmp_path / "b"))


def test_init_checkpoint_of_another_shape_is_an_error(tmp_path, data_dir, bundled_tokenizer):
  other = ModelConfig(vocab_size=2048, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=128, max_len=128)
  save_policy(str(tmp_path / "other" / "checkpoints"), other, zeros=True)
  config = run_config("kto", "rlhf_feedback/mini", data_dir, bundled_tokenizer,
                      str(tmp_path / "other"))
  with pytest.raises(ckpt_lib.CheckpointShapeError, match=r"embed"):
    launch.run(config, str(tmp_path / "kto"))


def test_tokenizer_is_the_init_runs_own(tmp_path, bundled_tokenizer):
  """A PPO run folder records (and keeps a copy of) the tokenizer it trained with; KTO/DPO
  from it read that copy, whatever the run's saved config says."""
  from helpers import write_policy_run
  from rlhf_jax.core import run_folder
  from rlhf_jax.text import tokenizer as tok_lib
  vocab = tok_lib.Tokenizer.load(bundled_tokenizer).vocab_size
  ppo_run = str(tmp_path / "ppo")
  write_policy_run(ppo_run, bundled_tokenizer, vocab, config={"tokenizer": {"path": ""}})
  found = run_folder.tokenizer_source(run_folder.checkpoint_dir(ppo_run))
  assert found == run_folder.tokenizer_file(ppo_run)
  with open(found, "rb") as copy, open(bundled_tokenizer, "rb") as original:
    assert copy.read() == original.read()


@pytest.mark.heavy  # KTO on exported chat feedback; KTO's learning is tested on the bundled likes above
@pytest.mark.slow
def test_exported_chat_feedback_trains_kto(tmp_path, bundled_tokenizer, sft_dir):
  """Clicks in the chat store -> `feedback export` -> rlhf_feedback/chat -> a few KTO steps."""
  from rlhf_jax.data import feedback as feedback_lib
  from rlhf_jax.data.rm_batches import read_records
  chat_dir = str(tmp_path / "chat")
  os.makedirs(os.path.dirname(feedback_lib.default_path(chat_dir)), exist_ok=True)
  with feedback_lib.FeedbackStore(feedback_lib.default_path(chat_dir)) as store:
    for record in feedback_records(n_liked=12, n_disliked=12):
      conversation = store.start_conversation("en")
      store.add_message(conversation, "user", record["prompt"])
      answer = store.add_message(conversation, "assistant", record["response"] + record["id"],
                                 checkpoint_step=1)
      store.add_feedback(answer, "like" if record["label"] else "dislike")
  data_dir = str(tmp_path / "tfds")
  counts = feedback_lib.export(chat_dir, data_dir=data_dir, config="chat")
  assert (counts["likes"], counts["dislikes"]) == (12, 12)

  train = read_records("rlhf_feedback/chat", "train", data_dir)
  likes = sum(r["label"] for r in train)
  assert 0 < likes < len(train)  # both kinds reached the training split
  config = run_config("kto", "rlhf_feedback/chat", data_dir, bundled_tokenizer, sft_dir,
                      steps=3, batch=8)
  workdir = str(tmp_path / "kto")
  metrics = launch.run(config, workdir)
  # λ_U from the exported training split's own counts (λ_D·n_D / (λ_U·n_U) = 1): the trainer
  # read exactly what the export wrote.
  assert metrics["kto/undesirable_weight"] == pytest.approx(likes / (len(train) - likes))
  losses = logged_losses(workdir, "kto/loss")
  assert len(losses) == 3 and all(np.isfinite(losses))
