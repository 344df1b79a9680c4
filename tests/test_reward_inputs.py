"""Reward batches: preferences from rankings and grades, padding, and bad input (identical
answers, all-tie grades, too many answers) skipped or refused, and counted."""
import logging

import numpy as np
import pytest

from rlhf_jax.infer import rm_scores as reward
from rlhf_jax.data.builders import comparison_pairs
from rlhf_jax.data import rm_batches as rm_inputs


@pytest.fixture(scope="module")
def tokenizer(bundled_tokenizer):
  from rlhf_jax.text import tokenizer as tok_lib
  return tok_lib.Tokenizer.load(bundled_tokenizer)


def encode(tokenizer, records, pairs=None, k=4, seq_len=48, n_rows=None, margin=0.0):
  encoder = rm_inputs.Encoder(tokenizer, seq_len=seq_len, max_answers=k, margin=margin)
  pairs = pairs or [None] * len(records)
  batch = encoder.encode_batch(records, pairs, n_rows or len(records))
  return batch, dict(zip(rm_inputs.STAT_KEYS, batch.pop("stats")))


def pairs_of(prefer, valid):
  k = prefer.shape[0]
  return sorted((i, j) for i in range(k) for j in range(k) if prefer[i, j] and valid[i] and valid[j])


@pytest.mark.parametrize("record", [
    {"id": "g", "prompt": "hi", "responses": ["a", "b", "c", "d"], "grades": [1, 0, 2, 1]},
    {"id": "r", "prompt": "hi", "responses": ["a", "b", "c"], "ranking": [2, 0, 1]},
    {"id": "g2", "prompt": "你好", "responses": ["好", "差"], "grades": [2, 0], "lang": "zh"},
])
def test_preferences_are_the_pairs_the_labels_imply(tokenizer, record):
  batch, stats = encode(tokenizer, [record])
  k = len(record["responses"])
  assert pairs_of(batch["prefer"][0], batch["valid"][0]) == sorted(comparison_pairs(record))
  np.testing.assert_array_equal(batch["valid"][0], [1] * k + [0] * (4 - k))  # padded to K = 4
  assert stats["elements"] == 1 and stats["skipped_no_pairs"] == 0
  assert batch["lang"][0] == (1 if record.get("lang") == "zh" else 0 if record.get("lang") else -1)
  for i, response in enumerate(record["responses"]):  # each row: prompt + that answer, ending
    ids, _ = reward.encode_answer(tokenizer, record["prompt"], response, 48)  # on its <|end|>
    np.testing.assert_array_equal(batch["tokens"][0, i, :len(ids)], ids)
    assert batch["segment_ids"][0, i].sum() == len(ids)
    assert ids[-1] == tokenizer.end_id


def test_margin_scales_with_the_grade_gap(tokenizer):
  record = {"prompt": "hi", "responses": ["a", "b", "c"], "grades": [0, 1, 2]}
  batch, _ = encode(tokenizer, [record], margin=0.5)
  assert batch["margin"][0, 0, 2] == 1.0 and batch["margin"][0, 0, 1] == 0.5
  assert batch["margin"][0, 2, 0] == 0.0


def test_identical_answers_give_no_pair_and_are_counted(tokenizer):
  record = {"id": "dup", "prompt": "hi", "responses": ["same", "same", "other"],
            "grades": [0, 1, 2]}
  batch, stats = encode(tokenizer, [record])
  assert pairs_of(batch["prefer"][0], batch["valid"][0]) == [(0, 2), (1, 2)]
  assert stats["identical_pairs"] == 1 and stats["skipped_no_pairs"] == 0


def test_all_tie_and_all_identical_comparisons_are_skipped_counted_and_logged(tokenizer, caplog):
  records = [{"id": "ties", "prompt": "hi", "responses": ["a", "b", "c"], "grades": [1, 1, 1]},
             {"id": "copies", "prompt": "hi", "responses": ["x", "x"], "ranking": [1, 0]},
             {"id": "fine", "prompt": "hi", "responses": ["x", "y"], "ranking": [1, 0]}]
  with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
    batch, stats = encode(tokenizer, records)
  assert stats["skipped_no_pairs"] == 2 and stats["elements"] == 3
  assert batch["valid"][:2].sum() == 0 and batch["valid"][2].sum() == 2
  assert "'ties'" in caplog.text and "'copies'" in caplog.text


def test_more_answers_than_configured_is_a_clear_error(tokenizer):
  record = {"id": "wide", "prompt": "hi", "responses": list("abcde"), "ranking": [0, 1, 2, 3, 4]}
  with pytest.raises(rm_inputs.TooManyAnswersError, match=r"'wide' has K=5.*max_answers=4"):
    encode(tokenizer, [record])


def test_pair_elements_and_thumbs(tokenizer):
  record = {"prompt": "hi", "responses": ["a", "b", "c"], "grades": [2, 0, 1]}
  batch, _ = encode(tokenizer, [record, record], pairs=[(1, 0), (2, 0)], k=2)
  for n, (w, l) in enumerate([(1, 0), (2, 0)]):  # each pair: answer 0 beat answer 1
    assert pairs_of(batch["prefer"][n], batch["valid"][n]) == [(0, 1)]
    ids, _ = reward.encode_answer(tokenizer, "hi", record["responses"][w], 48)
    np.testing.assert_array_equal(batch["tokens"][n, 0, :len(ids)], ids)
  thumbs, _ = encode(tokenizer, [{"prompt": "hi", "response": "ok", "label": 0, "lang": "en"}],
                     k=1, n_rows=2)
  assert thumbs["labeled"].tolist() == [[1.0], [0.0]] and thumbs["label"][0, 0] == 0
  assert thumbs["prefer"].sum() == 0


class ListSource:
  """A data source over plain records, for the element table."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitems__(self, indices):
    return [self.records[i] for i in indices]


def test_element_table_lists_every_pair_once():
  records = [{"prompt": "p", "responses": ["a", "b", "c"], "grades": [0, 1, 1]},
             {"prompt": "q", "responses": ["a", "b"], "ranking": [1, 0]}]
  table = rm_inputs.element_table(ListSource(records), "pair")
  assert sorted(map(tuple, table.tolist())) == [(0, 0, 1), (0, 0, 2), (1, 1, 0)]
  whole = rm_inputs.element_table(ListSource(records), "comparison")
  assert whole.tolist() == [[0, -1, -1], [1, -1, -1]]


def test_one_epoch_then_empty_batches_and_exact_resume(tokenizer):
  records = [{"id": str(i), "prompt": f"p{i}", "responses": [f"a{i}", f"b{i}"],
              "ranking": [0, 1]} for i in range(5)]
  source = ListSource(records)
  table = rm_inputs.element_table(source, "comparison")
  encoder = rm_inputs.Encoder(tokenizer, seq_len=32, max_answers=2)

  def make():
    return rm_inputs.ComparisonBatches(source, table, encoder, batch_size=2, seed=3)

  steps = rm_inputs.steps_per_epochs(len(table), 2, 1, 1)
  assert steps == 3
  it = make()
  batches = [next(it) for _ in range(steps + 1)]
  assert sum(b["valid"].sum() for b in batches) == 10  # 5 comparisons x 2 answers, once each
  assert batches[-1]["valid"].sum() == 0 and it.exhausted  # spent: an empty batch
  seen = [tuple(b["tokens"][r, 0, :6]) for b in batches[:steps] for r in range(2)
          if b["valid"][r].any()]
  assert len(set(seen)) == 5

  first = make()
  next(first)
  state = first.get_state()
  resumed = make()
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], batches[1]["tokens"])
  assert resumed.stats["elements"] == 4
