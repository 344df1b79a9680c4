"""Simulated annotators: calibration to a target agreement, Plackett-Luce marginals, grades."""
import itertools
import json
import math
import os

import numpy as np
import pytest

from rlhf_jax.data import annotators as A


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def vader_pool():
  """Gold (VADER) scores of 800 real chat turns, shuffled: a realistic spread of answers.

  Whole turns (one speaker's messages joined) rather than single messages: single short
  messages score exactly 0 under VADER ~43% of the time, which caps reachable agreement
  near 0.9; turns are closer in length to model answers (~29% zeros).
  """
  chitchat_dataset = pytest.importorskip("chitchat_dataset")
  from rlhf_jax.data import labelers
  path = os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")
  with open(path) as f:
    convos = json.load(f)
  turns = [" ".join(m["text"] for m in turn)
           for cid in sorted(convos)[:100] for turn in convos[cid]["messages"]]
  scores = labelers.score(turns, "en", "gold").astype(np.float64)
  return scores[np.random.default_rng(0).permutation(len(scores))[:800]]


@pytest.mark.parametrize("target", [A.HUMAN_AGREEMENT, 0.9])
def test_calibrated_annotators_agree_at_the_target_rate(vader_pool, target):
  tau = A.calibrate_temperature(vader_pool.reshape(200, 4), target)
  assert tau > 0
  # Two independent annotators on 40k fresh pairs drawn from the same answers.
  rng = np.random.default_rng(7)
  i, j = rng.integers(0, len(vader_pool), (2, 40_000))
  keep = i != j
  a, b = vader_pool[i[keep]], vader_pool[j[keep]]
  first = A.AnnotatorPanel(tau, seed=1).compare(a, b)
  second = A.AnnotatorPanel(tau, seed=2).compare(a, b)
  measured = np.mean(first == second)
  assert abs(measured - target) < 0.02, (tau, measured)


def test_expected_agreement_matches_the_pair_formula():
  scores = np.array([[0.0, 0.5], [0.2, 0.2], [1.0, -1.0]])
  tau = 0.3
  ps = [_sigmoid(abs(x - y) / tau) for x, y in scores]
  want = np.mean([p * p + (1 - p) * (1 - p) for p in ps])
  assert A.expected_agreement(scores, tau) == pytest.approx(want, rel=1e-12)


def test_calibration_solves_the_equation_and_is_monotone():
  scores = np.random.default_rng(0).normal(size=(300, 4))
  taus = [A.calibrate_temperature(scores, t) for t in (0.6, A.HUMAN_AGREEMENT, 0.9)]
  assert taus[0] > taus[1] > taus[2] > 0
  assert A.expected_agreement(scores, taus[1]) == pytest.approx(A.HUMAN_AGREEMENT, abs=1e-7)


def test_unreachable_targets_are_refused():
  scores = np.array([[0.0, 0.0], [0.0, 1.0]])  # half the pairs tied: ceiling 0.75
  with pytest.raises(ValueError, match="not reachable"):
    A.calibrate_temperature(scores, 0.8)
  with pytest.raises(ValueError, match="not reachable"):
    A.calibrate_temperature(scores, 0.5)
  assert A.calibrate_temperature(scores, 0.7) > 0


def test_plackett_luce_pairwise_marginals_are_bradley_terry():
  # Distinct gaps, one near-tie, K = 4: each pair's marginal must be sigma(gap / tau)
  # whatever the other two answers are.
  scores = np.array([0.3, -0.2, 0.5, 0.45])
  tau, n = 0.2, 100_000
  rankings = A.sample_rankings(np.tile(scores, (n, 1)), tau, np.random.default_rng(3))
  position = np.argsort(rankings, axis=1)  # position[r, answer]
  for i, j in itertools.combinations(range(4), 2):
    want = _sigmoid((scores[i] - scores[j]) / tau)
    got = np.mean(position[:, i] < position[:, j])
    tol = 4.5 * math.sqrt(want * (1 - want) / n)  # ~4.5 binomial standard deviations
    assert abs(got - want) < tol, (i, j, got, want)


def test_rankings_are_plackett_luce_first_choices():
  # The first-ranked answer of a Plackett-Luce ranking is a softmax draw over s / tau.
  scores = np.array([0.3, -0.2, 0.5, 0.45])
  tau, n = 0.2, 100_000
  rankings = A.sample_rankings(np.tile(scores, (n, 1)), tau, np.random.default_rng(4))
  want = np.exp(scores / tau) / np.exp(scores / tau).sum()
  got = np.bincount(rankings[:, 0], minlength=4) / n
  tol = 4.5 * np.sqrt(want * (1 - want) / n)
  assert np.all(np.abs(got - want) < tol), (got, want)


def test_rankings_are_permutations_and_zero_tau_sorts():
  scores = np.random.default_rng(0).normal(size=(50, 6))
  rankings = A.AnnotatorPanel(0.0, seed=0).rank(scores)
  np.testing.assert_array_equal(np.sort(rankings, axis=1), np.tile(np.arange(6), (50, 1)))
  np.testing.assert_array_equal(rankings, np.argsort(-scores, axis=1))


def test_zero_tau_breaks_ties_by_a_fair_coin():
  prefs = A.AnnotatorPanel(0.0, seed=0).compare(np.zeros(20_000), np.zeros(20_000))
  assert abs(prefs.mean() - 0.5) < 0.02
  assert A.AnnotatorPanel(0.0, seed=0).compare([1.0, -1.0], [0.5, 0.0]).tolist() == [True, False]


def test_panel_is_deterministic_given_the_seed():
  scores = np.random.default_rng(0).normal(size=(30, 5))
  assert np.array_equal(A.AnnotatorPanel(0.5, seed=11).rank(scores),
                        A.AnnotatorPanel(0.5, seed=11).rank(scores))
  assert not np.array_equal(A.AnnotatorPanel(0.5, seed=11).rank(scores),
                            A.AnnotatorPanel(0.5, seed=12).rank(scores))


def test_three_annotators_give_a_majority_vote():
  # Average rank over 3 annotators on K = 2 is their majority: P = p^3 + 3 p^2 (1 - p).
  tau, gap, n = 0.5, 0.4, 40_000
  p = _sigmoid(gap / tau)
  want = p ** 3 + 3 * p * p * (1 - p)
  prefs = A.AnnotatorPanel(tau, n_annotators=3, seed=5).compare(np.full(n, gap), np.zeros(n))
  assert abs(prefs.mean() - want) < 4.5 * math.sqrt(want * (1 - want) / n)


@pytest.mark.parametrize("k,expected", [
    (2, [0, 2]),
    (3, [0, 1, 2]),
    (4, [0, 1, 1, 2]),
    (5, [0, 0, 1, 2, 2]),
    (8, [0, 0, 0, 1, 1, 2, 2, 2]),
    (9, [0, 0, 0, 1, 1, 1, 2, 2, 2]),
])
def test_grading_rule(k, expected):
  # Ranking by position: answer r is at position r, so grades follow the rule directly.
  grades = A.grades_from_rankings(np.arange(k)[None, :])
  assert grades.tolist() == [expected]
  # And grades are indexed by answer, not by position.
  reverse = A.grades_from_rankings(np.arange(k)[None, ::-1])
  assert reverse.tolist() == [expected[::-1]]


def test_panel_grades_follow_the_scores_when_noiseless():
  grades = A.AnnotatorPanel(0.0, seed=0).grade([[0.1, 0.9, -0.5, 0.3]])
  assert grades.tolist() == [[A.AVERAGE, A.GOOD, A.POOR, A.AVERAGE]]


def test_grade_counts_per_row():
  for k in range(1, 13):
    n_good, n_avg, n_poor = A.grade_counts(k)
    assert n_good + n_avg + n_poor == k and n_good == n_poor
    rankings = np.stack([np.random.default_rng(k).permutation(k) for _ in range(5)])
    for row in A.grades_from_rankings(rankings):
      assert np.bincount(row, minlength=3).tolist() == [n_good, n_avg, n_poor]


def _pairs_reference(row):
  return [(i, j) for i in range(len(row)) for j in range(len(row)) if row[i] < row[j]]


def test_pairs_from_grades_match_a_double_loop():
  rng = np.random.default_rng(0)
  for k in range(1, 10):
    grades = rng.integers(0, 3, size=(20, k))
    got = A.pairs_from_grades(grades)
    assert got == [_pairs_reference(row.tolist()) for row in grades]
    assert all(type(i) is int for pairs in got for pair in pairs for i in pair)


def test_ties_give_no_pair():
  assert A.pairs_from_grades([[1, 1, 1], [0, 0, 2]]) == [[], [(0, 2), (1, 2)]]
  assert A.pairs_from_grades([[0, 1, 1, 2]]) == [[(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)]]


def test_preference_matrix_is_the_dense_form_of_the_pairs():
  grades = np.random.default_rng(1).integers(0, 3, size=(10, 5))
  m = A.preference_matrix(grades)
  for row, pairs in zip(m, A.pairs_from_grades(grades)):
    assert sorted(zip(*np.nonzero(row))) == pairs
    assert not np.any(row & row.T)
  with pytest.raises(TypeError):
    A.preference_matrix(np.zeros((2, 3)))
