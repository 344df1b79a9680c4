"""Held-out RM metrics against hand-counted references: label and gold accuracy per language,
margin, thumbs, and a calibration table that accounts for every pair."""
import itertools

import numpy as np
import pytest

from rlhf_jax.eval import reward_model as evaluate_rm


def test_metrics_match_a_hand_count():
  scores = np.array([[3.0, 1.0, 2.0],    # en: labels say 0 > 1 > 2
                     [0.0, 1.0, 0.0]])   # zh: labels say 0 > 1; answer 2 is padding
  prefer = np.zeros((2, 3, 3))
  prefer[0, 0, 1] = prefer[0, 0, 2] = prefer[0, 1, 2] = 1
  prefer[1, 0, 1] = 1
  prefer[1, 0, 2] = 1  # a pair with the padded answer: ignored
  valid = np.array([[1, 1, 1], [1, 1, 0]])
  gold = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, np.nan]])  # zh answers tie: no gold pair
  m, table = evaluate_rm.comparison_metrics(scores, valid, prefer, np.array([0, 1]), gold)
  # en pairs (0,1) right, (0,2) right, (1,2) wrong; zh pair (0,1) wrong.
  assert m["pairs"] == 4 and m["accuracy"] == pytest.approx(2 / 4)
  assert m["accuracy/en"] == pytest.approx(2 / 3) and m["accuracy/zh"] == 0.0
  assert m["margin/en"] == pytest.approx((2 + 1 - 1) / 3)
  # gold en: 0 > 2 > 1 -> pairs (0,2) right, (0,1) right, (2,1) right; zh: none.
  assert m["gold_accuracy"] == 1.0 and m["gold_pairs"] == 3 and "gold_accuracy/zh" not in m
  nll = lambda x: np.log1p(np.exp(-x))  # noqa: E731
  en_loss = (nll(2.0) + nll(1.0) + nll(-1.0)) / 3
  assert m["loss/en"] == pytest.approx(en_loss)
  assert m["loss"] == pytest.approx((en_loss + nll(-1.0)) / 2)  # per prompt, then averaged
  assert sum(row["n"] for row in table) == 2 * 4  # every pair, both ways round
  for row in table:
    assert row["lo"] <= row["predicted"] <= row["hi"]


def test_thumbs_accuracy():
  scores = np.array([[1.5], [-0.5], [0.3]])
  m, _ = evaluate_rm.comparison_metrics(
      scores, np.ones((3, 1)), np.zeros((3, 1, 1)), np.array([0, 0, 0]),
      label=np.array([[1], [0], [0]]), labeled=np.ones((3, 1)))
  assert m["thumbs_accuracy"] == pytest.approx(2 / 3) and m["thumbs"] == 3


def test_gold_gap_thirds_match_a_python_loop():
  """Per language, the gold pairs sorted by gold gap and cut in thirds: the RM's accuracy and
  the labels' agreement with gold in each third, against a loop over the pairs."""
  rng = np.random.default_rng(0)
  n, k = 12, 4
  scores = rng.normal(size=(n, k))
  gold = rng.random((n, k))
  gold[0, 1] = gold[0, 0]  # a tie: no gold pair
  gold[1, 3] = np.nan  # unknown: no gold pair
  valid = np.ones((n, k))
  valid[2, 2] = 0  # padding: no pair
  ranking = np.argsort(-(gold + rng.normal(scale=0.3, size=(n, k))), axis=1)  # noisy labels
  prefer = np.zeros((n, k, k))
  for r in range(n):
    for a in range(k):
      for b in range(a + 1, k):
        prefer[r, ranking[r, a], ranking[r, b]] = 1
  prefer[3] = 0  # a comparison whose labels are all ties: each counts half
  lang = np.array([0, 1] * (n // 2))
  m, _ = evaluate_rm.comparison_metrics(scores, valid, prefer, lang, gold)
  for li, name in enumerate(("en", "zh")):
    pairs = []  # (gap, RM right, labels agree)
    for r in np.flatnonzero(lang == li):
      for i in range(k):
        for j in range(k):
          if (valid[r, i] and valid[r, j] and np.isfinite(gold[r, i]) and np.isfinite(gold[r, j])
              and gold[r, i] > gold[r, j]):
            d = scores[r, i] - scores[r, j]
            agree = 1.0 if prefer[r, i, j] else 0.0 if prefer[r, j, i] else 0.5
            pairs.append((gold[r, i] - gold[r, j], float(d > 0) + 0.5 * (d == 0), agree))
    pairs.sort(key=lambda p: p[0])
    assert m[f"gold_pairs/{name}"] == len(pairs)
    cuts = [0] + [len(part) for part in np.array_split(np.arange(len(pairs)), 3)]
    cuts = np.cumsum(cuts)
    for b in range(3):
      part = pairs[cuts[b]:cuts[b + 1]]
      assert m[f"gold_gap{b + 1}_accuracy/{name}"] == pytest.approx(np.mean([p[1] for p in part]))
      assert m[f"gold_gap{b + 1}_labels/{name}"] == pytest.approx(np.mean([p[2] for p in part]))
      assert m[f"gold_gap{b + 1}_hi/{name}"] == pytest.approx(part[-1][0])
  assert "gold_gap1_accuracy" not in m  # not across languages: their gold units differ
  table = evaluate_rm.markdown_table(m).splitlines()
  row = next(line for line in table if line.startswith("| zh |") and "gap <=" in line)
  assert row.split(" | ")[3].startswith(f"{m['gold_gap3_accuracy/zh']:.3f} / "
                                        f"{m['gold_gap3_labels/zh']:.3f}")


def _best_of_n_by_enumeration(scores, gold, valid, n):
  """Every n-subset of a prompt's usable answers and every comparator outside it, listed."""
  out = []
  for row in range(len(scores)):
    usable = [i for i in range(scores.shape[1]) if valid[row, i] and np.isfinite(gold[row, i])]
    draws = []
    for subset in itertools.combinations(usable, n):
      # the RM's pick: highest score, the earlier position on a tie (as a stable sort)
      pick = max(subset, key=lambda i: (scores[row, i], -i))
      for c in usable:
        if c not in subset:
          g, h = gold[row, pick], gold[row, c]
          draws.append(1.0 if g > h else 0.5 if g == h else 0.0)
    out.append(np.mean(draws) if draws else np.nan)
  return np.array(out)


def test_best_of_n_win_equals_the_enumeration_of_every_subset_and_comparator():
  rng = np.random.default_rng(1)
  n_rows, k = 9, 6
  scores = rng.normal(size=(n_rows, k))
  scores[0, 3] = scores[0, 1]  # an RM tie
  gold = rng.integers(0, 4, size=(n_rows, k)).astype(float)  # few levels: many gold ties
  gold[1, 2] = np.nan  # unknown gold: left out
  valid = np.ones((n_rows, k))
  valid[2, 4:] = 0  # padding: 4 usable answers
  valid[3, 2:] = 0  # 2 usable: too few for n >= 2
  for n in (1, 2, 3, 5):
    got = evaluate_rm.best_of_n_win(scores, gold, valid, n)
    want = _best_of_n_by_enumeration(scores, gold, valid, n)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isnan(got[3]) == (n >= 2)
  # n = 1 is a random answer against another: one half exactly, whatever the scores.
  np.testing.assert_allclose(evaluate_rm.best_of_n_win(scores, gold, valid, 1)[4:], 0.5)
  # An RM that orders as gold does (no gold ties) picks the best of n: with n = k - 1 the pick
  # loses only when the comparator is the best answer, which happens 1 time in k.
  exact = rng.permutation(k).astype(float)[None]
  assert evaluate_rm.best_of_n_win(exact, exact, np.ones((1, k)), k - 1)[0] == pytest.approx(
      1 - 1 / k)


def test_best_of_n_reported_per_language_with_its_kl():
  rng = np.random.default_rng(2)
  n_rows, k = 8, 8
  scores, gold = rng.normal(size=(n_rows, k)), rng.random((n_rows, k))
  lang = np.array([0, 1] * (n_rows // 2))
  m, _ = evaluate_rm.comparison_metrics(scores, np.ones((n_rows, k)), np.zeros((n_rows, k, k)),
                                        lang, gold)
  assert evaluate_rm.best_of_n_sizes(k) == [2, 4, 7]
  for li, name in enumerate(["en", "zh"]):
    for n in (2, 4, 7):
      rows = lang == li
      want = _best_of_n_by_enumeration(scores[rows], gold[rows], np.ones((4, k)), n).mean()
      assert m[f"gold_bon{n}_win/{name}"] == pytest.approx(want)
  assert "gold_bon2_win" not in m  # per language only
  assert evaluate_rm.best_of_n_kl(7) == pytest.approx(np.log(7) - 6 / 7)
  table = evaluate_rm.markdown_table(m)
  assert f"n=7 (KL {np.log(7) - 6 / 7:.2f})" in table
  assert f" {m['gold_bon7_win/zh']:.3f} |" in table.split("zh: the RM's best of n")[1]
