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


# ---------------------------------------------------------------------------------------------
# The shared_prompt layout: a comparison's prompt once, its answers after it.

SHARED = {"id": "s", "prompt": "tell me about the weather today",
          "responses": ["it is sunny and warm", "rain", "I do not know, sorry about that"],
          "grades": [0, 2, 1]}


def encode_shared(tokenizer, records, row_len, k=4, seq_len=64):
  encoder = rm_inputs.Encoder(tokenizer, seq_len=seq_len, max_answers=k,
                              layout="shared_prompt", row_len=row_len)
  batch = encoder.encode_batch(records, [None] * len(records), len(records))
  return batch, dict(zip(rm_inputs.STAT_KEYS, batch.pop("stats")))


def test_shared_prompt_rows_hold_each_answers_own_row_once_its_prompt_is_shared(tokenizer):
  """Prefix + answer i's own tokens, read through the segments, is the answers layout's row i
  (token for token, position for position); score_at is that row's last token (<|end|>)."""
  rows, row_stats = encode(tokenizer, [SHARED], seq_len=64)
  shared, stats = encode_shared(tokenizer, [SHARED], row_len=96)
  assert row_stats["truncated_answers"] == 0
  tokens, seg, pos, prefix = (shared[k][0] for k in ("tokens", "segment_ids", "positions",
                                                      "prefix_ids"))
  n_prefix = int((seg == 1).sum())
  assert n_prefix > 0 and (prefix[seg == 1] == 0).all()
  for i in range(len(SHARED["responses"])):
    own = seg == 2 + i
    assert (prefix[own] == 1).all()
    want = rows["tokens"][0, i][rows["segment_ids"][0, i] > 0]
    np.testing.assert_array_equal(np.concatenate([tokens[seg == 1], tokens[own]]), want)
    np.testing.assert_array_equal(pos[own], np.arange(n_prefix, len(want)))
    assert shared["score_at"][0, i] == np.flatnonzero(own)[-1]
    assert tokens[shared["score_at"][0, i]] == tokenizer.end_id
  # fewer positions than K rows: the prompt's tokens are written once
  used = int((seg > 0).sum())
  assert used == n_prefix + sum(int(r.sum()) - n_prefix for r in rows["segment_ids"][0][:3])
  assert used < int(rows["segment_ids"][0].sum())
  assert stats["truncated_answers"] == 0 and shared["valid"][0].tolist() == [1, 1, 1, 0]


def test_shared_prompt_row_too_short_cuts_the_prompt_then_refuses(tokenizer):
  """A row_len the comparison does not fit: the shared prompt loses its oldest tokens after
  the first (counted once per answer); one its answers alone do not fit is an error naming
  the comparison and data.row_len."""
  full, _ = encode_shared(tokenizer, [SHARED], row_len=96)
  used = int((full["segment_ids"][0] > 0).sum())
  n_prefix = int((full["segment_ids"][0] == 1).sum())
  cut, stats = encode_shared(tokenizer, [SHARED], row_len=used - 3)
  seg = cut["segment_ids"][0]
  assert int((seg == 1).sum()) == n_prefix - 3 and stats["truncated_answers"] == 3
  assert cut["tokens"][0, 0] == full["tokens"][0, 0]  # the first token stays
  np.testing.assert_array_equal(cut["tokens"][0][seg == 1][1:],
                                full["tokens"][0][full["segment_ids"][0] == 1][4:])
  for i in range(3):  # each answer's own tokens whole, its score still at its end
    np.testing.assert_array_equal(cut["tokens"][0][seg == 2 + i],
                                  full["tokens"][0][full["segment_ids"][0] == 2 + i])
    assert cut["tokens"][0, cut["score_at"][0, i]] == tokenizer.end_id
  with pytest.raises(ValueError, match=r"comparison 's'.*data\.row_len=8 .*raise data\.row_len"):
    encode_shared(tokenizer, [SHARED], row_len=8)


def test_unknown_layout_and_missing_row_len_are_refused(tokenizer):
  with pytest.raises(ValueError, match=r"unknown data\.layout 'shared'"):
    rm_inputs.Encoder(tokenizer, seq_len=48, max_answers=4, layout="shared")
  with pytest.raises(ValueError, match=r"needs data\.row_len >= 2 \(got 0\)"):
    rm_inputs.Encoder(tokenizer, seq_len=48, max_answers=4, layout="shared_prompt")


def tiny_rm_and_batches(tokenizer, config, seed: int):
  """(a tiny random ScalarModel, its params, two comparisons in the answers layout, the same
  in the shared_prompt layout)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from rlhf_jax.models.heads import ScalarModel
  model = ScalarModel(config)
  records = [SHARED, {"id": "t", "prompt": "what should I cook tonight", "lang": "en",
                      "responses": ["pasta", "a soup with beans", "nothing", "eggs"],
                      "ranking": [1, 0, 3, 2]}]
  rows, _ = encode(tokenizer, records, seq_len=64)
  shared, _ = encode_shared(tokenizer, records, row_len=96)
  first = (jnp.asarray(rows[k][:, 0]) for k in ("tokens", "positions", "segment_ids"))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), *first)["params"])
  return model, params, rows, shared


@pytest.mark.parametrize("local", [False, True])
def test_shared_prompt_batch_gives_the_answers_layouts_loss_and_gradients(tokenizer, local):
  """The RM's loss and every gradient from a batch of comparisons in the shared_prompt layout
  equal the answers layout's (a tiny random ScalarModel; relative 1e-5: the same sums in
  another order). `local`: with a sliding-window layer too, its window (12) shorter than the
  prompt and answers, so it binds, counted in positions across the shared prompt."""
  import dataclasses
  import jax
  from rlhf_jax.models.sizes import model_config
  from rlhf_jax.train import reward as rm_trainer
  config = model_config("tiny", vocab_size=tokenizer.vocab_size)
  if local:
    config = dataclasses.replace(config, local_layers=(0,), sliding_window=12,
                                 rope_local_theta=10000.0)
  model, params, rows, shared = tiny_rm_and_batches(tokenizer, config, seed=1)
  out = {}
  for name, batch in (("answers", rows), ("shared", shared)):
    fn = lambda p, b=batch: rm_trainer.rm_loss(p, b, model=model, kind="ranking",  # noqa: E731
                                               reduction="prompt")
    (loss, (count, scores)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    out[name] = (float(loss), float(count), np.asarray(scores), grads)
  assert out["shared"][1] == out["answers"][1] == 2.0
  np.testing.assert_allclose(out["shared"][0], out["answers"][0], rtol=1e-5)
  valid = rows["valid"] > 0
  scale = np.max(np.abs(out["answers"][2][valid]))
  np.testing.assert_allclose(out["shared"][2][valid], out["answers"][2][valid], rtol=1e-5,
                             atol=1e-5 * scale)
  # Relative to the largest gradient: the head's bias has none (a ranking loss only reads
  # differences of scores), so its leaf is rounding noise in both.
  leaves = [(np.asarray(a), np.asarray(b)) for a, b in
            zip(jax.tree.leaves(out["shared"][3]), jax.tree.leaves(out["answers"][3]))]
  largest = max(np.max(np.abs(b)) for _, b in leaves)
  for a, b in leaves:
    assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 0.1 * largest)


def test_last_token_scores_are_the_full_passs_values_at_each_answers_last_token(tokenizer):
  """comparison_scores (both layouts) and score_sequences run the RM's last layer at the scored
  tokens only; each score equals the full pass's value [.., T] read with numpy at the answer's
  last real token (answers layout: right-most nonzero segment; shared_prompt: score_at)."""
  import jax
  from rlhf_jax.models.sizes import model_config
  model, params, rows, shared = tiny_rm_and_batches(
      tokenizer, model_config("tiny", vocab_size=tokenizer.vocab_size), seed=2)
  apply = jax.jit(lambda p, t, x, s, prefix: model.apply({"params": p}, t, x, s,
                                                         prefix_ids=prefix))  # [B, T]
  full = lambda b, prefix_ids=None: np.asarray(apply(  # noqa: E731
      params, b["tokens"], b["positions"], b["segment_ids"], prefix_ids))
  # Answers layout: [B, K, T] rows, each read at its right-most real token.
  b, k, t = rows["tokens"].shape
  flat = {key: rows[key].reshape(b * k, t) for key in ("tokens", "positions", "segment_ids")}
  last = np.asarray([(np.nonzero(row)[0].tolist() or [t - 1])[-1]  # an empty row: T - 1
                     for row in flat["segment_ids"]])
  want = full(flat)[np.arange(b * k), last].reshape(b, k)
  got = np.asarray(jax.jit(lambda p, x: reward.comparison_scores(p, x, model))(params, rows))
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
  got = jax.jit(lambda p, x: reward.score_sequences(
      p, x["tokens"], x["positions"], x["segment_ids"], x["segment_ids"],
      model_config=model.config, gain=2.0, bias=1.0))(params, flat)
  np.testing.assert_allclose(got, 2.0 * want.reshape(-1) + 1.0, rtol=1e-5, atol=3e-5 * scale)
  # Shared-prompt layout: one row per comparison, the answers' last slots in score_at [B, K].
  want = np.take_along_axis(full(shared, prefix_ids=shared["prefix_ids"]), shared["score_at"], 1)
  got = np.asarray(jax.jit(lambda p, x: reward.comparison_scores(p, x, model))(params, shared))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


def test_a_mean_score_is_the_mean_of_each_answers_own_values(tokenizer):
  """score_pool="mean": an answer's score is the mean of the head's values over its own tokens
  (its <|end|> included), wherever they sit: after render_prompt's tokens in its own row (the
  reference, from the answers layout's values), in the shared_prompt layout (the tokens all
  answers start with are among the shared ones: answer_mask marks them) and through
  score_texts, the normalisation's path. The last-token readout is unchanged."""
  import dataclasses
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from rlhf_jax.infer import rm_scores
  from rlhf_jax.models.heads import ScalarModel
  from rlhf_jax.models.sizes import model_config
  config = model_config("tiny", vocab_size=tokenizer.vocab_size)
  mean_config = dataclasses.replace(config, score_pool="mean")
  record = {"id": "c", "prompt": "what should I cook tonight", "lang": "en",
            "responses": ["a soup with beans", "a salad", "a pie for two"], "ranking": [1, 0, 2]}
  rows, _ = encode(tokenizer, [record], seq_len=64)
  shared, _ = encode_shared(tokenizer, [record], row_len=96)
  seg = shared["segment_ids"][0]
  assert shared["answer_mask"][0][seg == 1].any()  # the answers' common first token is shared
  model = ScalarModel(config)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(2), *(jnp.asarray(rows[k][:, 0]) for k in
                                                            ("tokens", "positions",
                                                             "segment_ids")))["params"])
  b, k, t = rows["tokens"].shape
  values = np.asarray(model.apply({"params": params}, *(
      jnp.asarray(rows[key].reshape(b * k, t)) for key in ("tokens", "positions", "segment_ids"))))
  start = len(tokenizer.render_prompt([{"role": "user", "content": record["prompt"]}]))
  want = []
  for i, answer in enumerate(record["responses"]):
    n = int(rows["segment_ids"][0, i].sum())
    assert rows["tokens"][0, i, n - 1] == tokenizer.end_id and n - start >= 2
    want.append(values[i, start:n].mean())
  want = np.asarray(want)
  scale = np.max(np.abs(want))
  got = np.asarray(rm_scores.comparison_scores(
      params, {key: jnp.asarray(shared[key]) for key in rm_inputs.MODEL_KEYS["shared_prompt"]},
      ScalarModel(mean_config)))[0, :3]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
  texts = rm_scores.score_texts(params, mean_config, tokenizer, [record["prompt"]] * 3,
                                record["responses"], batch_size=4)
  np.testing.assert_allclose(texts, want, rtol=1e-5, atol=1e-5 * scale)
  last = rm_scores.score_texts(params, config, tokenizer, [record["prompt"]] * 3,
                               record["responses"], batch_size=4)
  ends = rows["segment_ids"][0, :3].sum(-1) - 1
  np.testing.assert_allclose(last, values[np.arange(3), ends], rtol=1e-5, atol=1e-5 * scale)
  assert np.max(np.abs(texts - last)) > 1e-3 * scale  # the two readouts differ
  with pytest.raises(ValueError, match=r"answers layout does not mark them"):
    rm_scores.comparison_scores(params, {key: jnp.asarray(rows[key]) for key in
                                         rm_inputs.MODEL_KEYS["answers"]}, ScalarModel(mean_config))


def test_a_mean_score_pool_needs_the_shared_prompt_layout_and_a_known_name():
  from configs import reward as reward_config
  from rlhf_jax.models.model_config import ModelConfig
  from rlhf_jax.train import reward as rm_trainer
  config = reward_config.get_config("size=tiny")
  config.score_pool = "mean"
  with pytest.raises(ValueError, match=r"only data.layout='shared_prompt'.*got data.layout="
                                       r"'answers'"):
    rm_trainer.build_model_config(config, 2048)
  config.data.layout, config.data.row_len = "shared_prompt", 96
  assert rm_trainer.build_model_config(config, 2048).score_pool == "mean"
  with pytest.raises(ValueError, match=r"score_pool='max' is not supported; supported: last, "
                                       r"mean"):
    ModelConfig(score_pool="max")


def test_the_answer_is_the_last_run_of_loss_tokens_where_the_template_closes_outside_it():
  """Gemma 3's rendering of [user 'hi there', assistant 'hello friend'] (ids and loss mask as
  its tokenizer gives them): the turn closes with <end_of_turn> (106) in the loss and a newline
  (107) outside it. The answer is 'hello friend' + <end_of_turn>: ids 11-13, not the newline,
  and an earlier assistant turn's loss tokens are not part of it."""
  from rlhf_jax.infer.rm_scores import encode_scored

  class Template:
    def __init__(self, ids, mask):
      self.out = (np.asarray(ids, np.int32), np.asarray(mask, np.int32))

    def render_chat(self, messages):
      return self.out

  ids = [2, 105, 2364, 107, 2202, 993, 106, 107, 105, 4368, 107, 23391, 4389, 106, 107]
  mask = [0] * 11 + [1, 1, 1, 0]
  got_ids, answer, cut = encode_scored(Template(ids, mask), "hi there", "hello friend", 64)
  assert not cut and got_ids.tolist() == ids
  assert np.flatnonzero(answer).tolist() == [11, 12, 13]
  two_turns = [0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0]  # a first assistant turn at 2-3
  _, answer, _ = encode_scored(Template(ids[:11], two_turns), "p", "a", 64)
  assert np.flatnonzero(answer).tolist() == [7, 8, 9]
  _, answer, cut = encode_scored(Template(ids[:11], two_turns), "p", "a", 6)  # BOS + last 5
  assert cut and answer.tolist() == [0, 0, 1, 1, 1, 0]
