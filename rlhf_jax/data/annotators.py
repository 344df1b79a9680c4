"""Simulated annotators: people who rank K answers, driven by a gold scorer plus noise.

The model. An annotator looking at answers with gold scores s_1..s_K prefers i to j with
probability sigma((s_i - s_j) / tau) (Bradley-Terry with temperature tau). A full ranking of
K answers is drawn from the Plackett-Luce model with utilities s / tau, by sorting the
Gumbel-perturbed utilities s / tau + G (G i.i.d. standard Gumbel): the "Gumbel trick".

Why this is consistent with the pairwise model for any K: i lands above j in the sorted list
iff s_i/tau + G_i > s_j/tau + G_j, iff G_j - G_i < (s_i - s_j)/tau, and the difference of two
independent standard Gumbels is standard logistic. So every pairwise marginal of the ranking
is exactly sigma((s_i - s_j)/tau), whatever the other K - 2 answers are (checked by Monte
Carlo in tests/test_annotators.py).

tau is set so that two independent annotators agree on a random pair as often as people do
(72.6% for InstructGPT's labelers): see `calibrate_temperature`. tau = 0 gives noiseless
annotators who always prefer the higher gold score (the setting of Gao et al., 2023); exact
ties in gold score are broken by a fair coin either way.

Grades. From a ranking, the top third is "good", the bottom third "poor", the rest
"average"; the size of a third is round(K / 3), at least 1 for K >= 2:

  K       2   3   4   5   6   7   8   9
  good    1   1   1   2   2   2   3   3
  average 0   1   2   1   2   3   2   3
  poor    1   1   1   2   2   2   3   3

So K = 2 gives one good and one poor answer, and K = 1 a single "average" (nothing to compare
it with). Within one ranking there are no ties; ties appear between answers of equal grade,
and such pairs give the reward model no comparison (`pairs_from_grades`).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

GOOD, AVERAGE, POOR = 0, 1, 2
GRADE_NAMES = ("good", "average", "poor")

# How often two InstructGPT labelers agreed on a comparison (72.6 +- 1.5%, InstructGPT §4.1).
HUMAN_AGREEMENT = 0.726


def _as_scores(scores) -> np.ndarray:
  """Scores as float64 [N, K]; refuses NaN, which would rank arbitrarily."""
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 2 or scores.shape[1] < 1:
    raise ValueError(f"scores must be [N, K] with K >= 1, got shape {scores.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores contain NaN or inf")
  return scores


def preference_probability(s_i, s_j, tau: float) -> np.ndarray:
  """P(an annotator prefers i to j) = sigma((s_i - s_j) / tau); tau = 0 is a hard step."""
  diff = np.asarray(s_i, dtype=np.float64) - np.asarray(s_j, dtype=np.float64)
  if tau == 0:
    return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
  return 0.5 * (1.0 + np.tanh(0.5 * diff / tau))  # sigma(x), without overflow


def sample_rankings(scores, tau: float, rng: np.random.Generator) -> np.ndarray:
  """One Plackett-Luce ranking per row: int [N, K], answer indices best first.

  Sorts s / tau + Gumbel noise. A uniform random secondary key breaks exact ties (only
  possible at tau = 0), so equal scores are ordered by a fair coin, never by position.
  """
  scores = _as_scores(scores)
  if tau < 0:
    raise ValueError(f"tau must be >= 0, got {tau}")
  key = scores if tau == 0 else scores / tau + rng.gumbel(size=scores.shape)
  tiebreak = rng.random(scores.shape)
  return np.lexsort((tiebreak, -key), axis=-1)


def grade_counts(k: int) -> tuple[int, int, int]:
  """(n_good, n_average, n_poor) for K answers: thirds of size round(K / 3), see module doc."""
  if k < 1:
    raise ValueError(f"need at least one answer, got K={k}")
  third = 0 if k == 1 else (2 * k + 3) // 6  # round(K / 3), halves rounded down
  return third, k - 2 * third, third


def grades_from_rankings(rankings) -> np.ndarray:
  """Grades int [N, K] (0 good, 1 average, 2 poor), indexed by answer, from best-first rankings."""
  rankings = np.asarray(rankings)
  n, k = rankings.shape
  n_good, _, n_poor = grade_counts(k)
  by_position = np.full(k, AVERAGE, dtype=np.int32)
  by_position[:n_good] = GOOD
  by_position[k - n_poor:] = POOR
  grades = np.empty((n, k), dtype=np.int32)
  np.put_along_axis(grades, rankings, by_position[None, :].repeat(n, axis=0), axis=-1)
  return grades


def _pair_gaps(scores) -> np.ndarray:
  """|s_i - s_j| for every pair i < j inside each row: the comparisons annotators make."""
  scores = _as_scores(scores)
  k = scores.shape[1]
  if k < 2:
    raise ValueError("need K >= 2 answers per row to form pairs")
  i, j = np.triu_indices(k, 1)
  return np.abs(scores[:, i] - scores[:, j]).reshape(-1)


def _agreement_from_gaps(gaps: np.ndarray, tau: float) -> float:
  """Mean of p^2 + (1-p)^2 = 1 - 2p(1-p), p = sigma(gap / tau), computed without overflow."""
  if tau == 0:
    return float(np.mean(np.where(gaps > 0, 1.0, 0.5)))
  e = np.exp(-gaps / tau)  # in (0, 1]; 2p(1-p) = 2e / (1+e)^2
  return float(1.0 - np.mean(2.0 * e / (1.0 + e) ** 2))


def expected_agreement(scores, tau: float) -> float:
  """P(two independent annotators agree on a pair), averaged over all in-row pairs of scores.

  Depends on the distribution of score gaps, not just on tau: the same tau gives more
  agreement on answers that differ a lot. Tied pairs (gap 0) agree only half the time, so
  the ceiling, at tau -> 0, is 1 - (fraction of tied pairs) / 2.
  """
  return _agreement_from_gaps(_pair_gaps(scores), tau)


def _bracket(gaps: np.ndarray, target: float, max_steps: int = 200) -> tuple[float, float]:
  """tau_lo, tau_hi with agreement(tau_lo) >= target >= agreement(tau_hi).

  Starts from the smallest and largest positive gaps and halves / doubles: agreement tends
  to its ceiling (> target) as tau -> 0 and to 1/2 (< target) as tau -> inf, so a few steps
  suffice; the step cap only guards against a broken agreement function.
  """
  positive = gaps[gaps > 0]
  lo, hi = float(positive.min()), float(positive.max())
  for _ in range(max_steps):
    if _agreement_from_gaps(gaps, lo) >= target:
      break
    lo /= 2.0
  for _ in range(max_steps):
    if _agreement_from_gaps(gaps, hi) <= target:
      break
    hi *= 2.0
  if not _agreement_from_gaps(gaps, lo) >= target >= _agreement_from_gaps(gaps, hi):
    raise RuntimeError(f"could not bracket tau for agreement {target}")
  return lo, hi


def calibrate_temperature(scores, target_agreement: float = HUMAN_AGREEMENT,
                          rtol: float = 1e-9, max_iter: int = 200) -> float:
  """The tau at which two independent annotators agree on `target_agreement` of pairs.

  `scores` are gold scores [N, K] of the answers the annotators will actually rank in this
  run (pass [M, 2] for plain pairs): the agreement tau buys depends on how far apart those
  scores are, so calibrate on the run's own answers, not on some other distribution.
  Expected agreement falls monotonically from its ceiling (tau -> 0) to 1/2 (tau -> inf);
  we bisect on log tau. Raises ValueError if the target is not reachable.
  """
  gaps = _pair_gaps(scores)
  ceiling = _agreement_from_gaps(gaps, 0.0)
  if not 0.5 < target_agreement < ceiling:
    raise ValueError(
        f"target agreement {target_agreement} is not reachable: it must lie in (0.5, "
        f"{ceiling:.4f}); {np.mean(gaps == 0):.1%} of the pairs have tied scores, and "
        f"annotators agree on a tie only half the time")
  lo, hi = _bracket(gaps, target_agreement)
  for _ in range(max_iter):
    mid = math.sqrt(lo * hi)
    if _agreement_from_gaps(gaps, mid) > target_agreement:
      lo = mid
    else:
      hi = mid
    if hi / lo - 1.0 < rtol:
      break
  return float(math.sqrt(lo * hi))


class AnnotatorPanel:
  """A panel of simulated annotators with noise tau, deterministic given the seed.

  Calls draw from one np.random.Generator, so the same seed and the same sequence of calls
  give the same labels. With n_annotators > 1 every annotator ranks each row independently
  and the panel reports the average-rank (Borda) consensus, ties in average rank broken by a
  fair coin; such a panel is less noisy than one annotator at the same tau.
  """

  def __init__(self, tau: float, n_annotators: int = 1, seed: int = 0,
               rng: Optional[np.random.Generator] = None):
    if tau < 0:
      raise ValueError(f"tau must be >= 0, got {tau}")
    if n_annotators < 1:
      raise ValueError(f"n_annotators must be >= 1, got {n_annotators}")
    self.tau = float(tau)
    self.n_annotators = int(n_annotators)
    self.rng = rng if rng is not None else np.random.default_rng(seed)

  def rank(self, scores) -> np.ndarray:
    """Rankings int [N, K]: answer indices, best first."""
    scores = _as_scores(scores)
    if self.n_annotators == 1:
      return sample_rankings(scores, self.tau, self.rng)
    positions = np.zeros(scores.shape)
    rows = np.arange(scores.shape[0])[:, None]
    for _ in range(self.n_annotators):
      ranking = sample_rankings(scores, self.tau, self.rng)
      positions[rows, ranking] += np.arange(scores.shape[1])  # position of each answer
    mean_position = positions / self.n_annotators
    return np.lexsort((self.rng.random(scores.shape), mean_position), axis=-1)

  def grade(self, scores) -> np.ndarray:
    """Grades int [N, K] (0 good, 1 average, 2 poor), indexed by answer."""
    return grades_from_rankings(self.rank(scores))

  def compare(self, scores_a, scores_b) -> np.ndarray:
    """bool [N]: True where the panel prefers answer a to answer b."""
    a = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
      raise ValueError(f"scores_a {a.shape} and scores_b {b.shape} differ in shape")
    return self.rank(np.stack([a, b], axis=1))[:, 0] == 0


def preference_matrix(grades) -> np.ndarray:
  """bool [N, K, K]: m[n, i, j] is True where answer i was graded better than answer j.

  Lower grade value is better; equal grades give False both ways (no pair). This is the
  dense form of `pairs_from_grades`, ready for a masked all-pairs ranking loss.
  """
  grades = np.asarray(grades)
  if grades.ndim != 2:
    raise ValueError(f"grades must be [N, K], got shape {grades.shape}")
  if not np.issubdtype(grades.dtype, np.integer):
    raise TypeError(f"grades must be integers, got {grades.dtype}")
  return grades[:, :, None] < grades[:, None, :]


def pairs_from_grades(grades) -> list[list[tuple[int, int]]]:
  """Per item, every (winner, loser) pair of answer indices with different grades.

  Lower grade value wins (0 good < 1 average < 2 poor); equal grades give no pair. Pairs come
  ordered by winner, then loser. For grades [0, 1, 1, 2] the item yields
  [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)].
  """
  return [[(int(i), int(j)) for i, j in zip(*np.nonzero(m))] for m in preference_matrix(grades)]
