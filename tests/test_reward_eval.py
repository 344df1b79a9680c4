"""Held-out RM metrics against hand-counted references: label and gold accuracy per language,
margin, thumbs, and a calibration table that accounts for every pair."""
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
