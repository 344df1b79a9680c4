"""Reward-model losses against plain-Python double loops: margins, padded answers, ties, K = 2."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import losses


def _nll(x: float) -> float:
  """-log sigma(x), computed the slow, obvious way (stable for both signs)."""
  return math.log1p(math.exp(-x)) if x > -30 else -x


def ranking_reference(scores, prefer, valid, margin, reduction):
  """Sum and count of the ranking loss by looping over prompts and pairs."""
  total, count = 0.0, 0
  b, k = scores.shape
  for n in range(b):
    pair_losses = [_nll(scores[n, i] - scores[n, j] - margin[n, i, j])
                   for i in range(k) for j in range(k)
                   if i != j and prefer[n, i, j] and valid[n, i] and valid[n, j]]
    if not pair_losses:
      continue
    if reduction == "prompt":
      total += sum(pair_losses) / len(pair_losses)
      count += 1
    else:
      total += sum(pair_losses)
      count += len(pair_losses)
  return total, count


def random_problem(seed, b=6, k=5):
  """Scores, grade-implied preferences (ties included), padded answers and per-pair margins."""
  rng = np.random.default_rng(seed)
  scores = rng.normal(0, 2, (b, k)).astype(np.float32)
  grades = rng.integers(0, 3, (b, k))
  grades[0] = 1  # an all-tie prompt: no pair at all
  prefer = (grades[:, :, None] < grades[:, None, :]).astype(np.float32)
  valid = np.ones((b, k), np.float32)
  valid[1, 3:] = 0  # padded answers
  valid[2, 1:] = 0  # one real answer: no pair
  margin = (0.3 * np.maximum(grades[:, None, :] - grades[:, :, None], 0)).astype(np.float32)
  return scores, prefer, valid, margin


@pytest.mark.parametrize("reduction", ["prompt", "pair"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_loss_matches_double_loop(reduction, seed):
  scores, prefer, valid, margin = random_problem(seed)
  got_sum, got_count = losses.ranking_loss(jnp.asarray(scores), jnp.asarray(prefer),
                                           jnp.asarray(valid), jnp.asarray(margin), reduction)
  ref_sum, ref_count = ranking_reference(scores, prefer, valid, margin, reduction)
  assert float(got_count) == ref_count
  np.testing.assert_allclose(float(got_sum), ref_sum, rtol=1e-5)


def test_ranking_loss_without_margin_or_mask():
  scores, prefer, _, _ = random_problem(3)
  ones, zeros = np.ones(scores.shape), np.zeros(prefer.shape)
  got_sum, got_count = losses.ranking_loss(jnp.asarray(scores), jnp.asarray(prefer))
  ref_sum, ref_count = ranking_reference(scores, prefer, ones, zeros, "prompt")
  assert float(got_count) == ref_count
  np.testing.assert_allclose(float(got_sum), ref_sum, rtol=1e-5)


def test_padded_answers_change_nothing():
  scores, prefer, valid, margin = random_problem(4, k=3)
  base = losses.ranking_loss(scores, prefer, valid, margin)
  # Two more answer slots, padded: garbage scores and preferences that must be ignored.
  wide_scores = np.concatenate([scores, np.full((scores.shape[0], 2), 1e4, np.float32)], 1)
  wide_prefer = np.ones((scores.shape[0], 5, 5), np.float32)
  wide_prefer[:, :3, :3] = prefer
  wide_valid = np.concatenate([valid, np.zeros((scores.shape[0], 2), np.float32)], 1)
  wide_margin = np.zeros((scores.shape[0], 5, 5), np.float32)
  wide_margin[:, :3, :3] = margin
  wide = losses.ranking_loss(wide_scores, wide_prefer, wide_valid, wide_margin)
  np.testing.assert_allclose(np.array(wide), np.array(base), rtol=1e-6)


def test_kwise_on_k2_equals_pairwise():
  rng = np.random.default_rng(5)
  chosen, rejected = rng.normal(size=8).astype(np.float32), rng.normal(size=8).astype(np.float32)
  scores = np.stack([chosen, rejected], axis=1)  # answer 0 preferred to answer 1
  prefer = np.zeros((8, 2, 2), np.float32)
  prefer[:, 0, 1] = 1
  for margin in (0.0, 0.7):
    pair_sum, pair_count = losses.bradley_terry_loss(chosen, rejected, margin)
    for reduction in ("prompt", "pair"):
      k_sum, k_count = losses.ranking_loss(scores, prefer, margin=margin, reduction=reduction)
      np.testing.assert_allclose(float(k_sum / k_count), float(pair_sum / pair_count), rtol=1e-6)


def test_bradley_terry_matches_reference_with_margin_and_mask():
  rng = np.random.default_rng(6)
  chosen, rejected = rng.normal(0, 3, 10), rng.normal(0, 3, 10)
  margin, mask = rng.uniform(0, 1, 10), (rng.uniform(size=10) > 0.3).astype(np.float32)
  got_sum, got_count = losses.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected),
                                                 jnp.asarray(margin), jnp.asarray(mask))
  ref = sum(_nll(c - r - m) for c, r, m, k in zip(chosen, rejected, margin, mask) if k)
  assert float(got_count) == mask.sum()
  np.testing.assert_allclose(float(got_sum), ref, rtol=1e-5)


def test_all_tie_grades_give_no_pair_and_no_loss():
  scores = np.array([[0.3, -1.0, 2.0]], np.float32)
  prefer = np.zeros((1, 3, 3), np.float32)  # grades [1, 1, 1]: ties imply nothing
  loss_sum, count = losses.ranking_loss(scores, prefer)
  assert float(count) == 0 and float(loss_sum) == 0


def test_binary_feedback_loss_matches_reference():
  rng = np.random.default_rng(7)
  scores, labels = rng.normal(0, 2, 12), rng.integers(0, 2, 12)
  mask = (rng.uniform(size=12) > 0.25).astype(np.float32)
  got_sum, got_count = losses.binary_feedback_loss(jnp.asarray(scores), jnp.asarray(labels),
                                                   jnp.asarray(mask))
  ref = sum(_nll(s if y == 1 else -s) for s, y, m in zip(scores, labels, mask) if m)
  assert float(got_count) == mask.sum()
  np.testing.assert_allclose(float(got_sum), ref, rtol=1e-5)


def test_preference_stats_match_reference():
  scores, prefer, valid, _ = random_problem(8)
  scores[3, 0] = scores[3, 1]  # an exact tie counts one half
  correct, pairs, margin_sum = losses.preference_stats(scores, prefer, valid)
  ref_correct = ref_pairs = ref_margin = 0.0
  b, k = scores.shape
  for n in range(b):
    for i in range(k):
      for j in range(k):
        if i != j and prefer[n, i, j] and valid[n, i] and valid[n, j]:
          d = scores[n, i] - scores[n, j]
          ref_correct += 1.0 if d > 0 else (0.5 if d == 0 else 0.0)
          ref_pairs += 1
          ref_margin += d
  assert float(pairs) == ref_pairs
  np.testing.assert_allclose(float(correct), ref_correct)
  np.testing.assert_allclose(float(margin_sum), ref_margin, rtol=1e-5)


def test_unknown_reduction_is_an_error():
  with pytest.raises(ValueError, match="reduction"):
    losses.ranking_loss(np.zeros((1, 2)), np.zeros((1, 2, 2)), reduction="mean")
