"""Comparison data: the planted rule, answers cleaned and counted, annotators calibrated (also
when most pairs are tied), records accepted by the comparisons writer's checks."""
import numpy as np

from rlhf_jax.data import annotators, jsonl, labelers
from rlhf_jax.recipe import comparisons


def test_planted_score_counts_positive_minus_negative_words():
  planted = labelers.get_scorer("planted")
  np.testing.assert_array_equal(
      planted(["good day and great food", "bad sad movie", "the cat"], "en"), [2, -2, 0])
  np.testing.assert_array_equal(planted(["我们喜欢这个手机，很好", "质量差"], "zh"), [2, -1])


def test_empty_and_duplicate_answers_are_dropped_and_counted():
  prompts = ["a", "b"]
  answers = [["good", "good", "", "bad"], ["good", "good", " "]]
  records, info = comparisons.build_records(prompts, answers, ["en", "en"], scorer="planted",
                                            tau=0.5)
  counts = info["langs"]["en"]
  assert counts["duplicate_answers"] == 2 and counts["empty_answers"] == 2
  assert counts["dropped_prompts"] == 1 and len(records) == 1
  assert records[0]["responses"] == ["good", "bad"]
  checked = jsonl.validate_records(records, "comparisons", origin="<test>")  # writable as is
  assert checked[0]["grades"] in ([0, 2], [2, 0])


def test_annotators_are_calibrated_to_human_agreement():
  records, info = comparisons.planted_records(120, 4, seed=1, label="ranking")
  for lang in ("en", "zh"):
    assert info["langs"][lang]["tau_status"] == "calibrated"
    assert abs(info["langs"][lang]["expected_agreement"] - annotators.HUMAN_AGREEMENT) < 1e-3
    assert 0.7 < info["langs"][lang]["label_gold_agreement"] < 0.95
  assert all(sorted(r["ranking"]) == list(range(len(r["responses"]))) for r in records)


def test_mostly_tied_scores_calibrate_on_the_untied_pairs():
  rng = np.random.default_rng(0)
  # 5 answers per prompt, 4 of them neutral (score 0): 6 of 10 pairs are ties, so overall
  # agreement cannot exceed 1 - 0.6 / 2 = 0.7 < 0.726.
  scores = [np.array([0.0, 0.0, 0.0, 0.0, rng.normal()]) for _ in range(200)]
  tau, status = comparisons._calibrate(scores, annotators.HUMAN_AGREEMENT, "en")
  assert status.startswith("calibrated on untied pairs")
  untied = np.array([[0.0, s[4]] for s in scores])
  assert abs(annotators.expected_agreement(untied, tau) - annotators.HUMAN_AGREEMENT) < 1e-6
