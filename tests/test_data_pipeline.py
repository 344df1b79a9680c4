"""grain pipeline: determinism, exact resume, process shards, packing against a reference."""
import collections
import json

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import builders, pipeline

PAD = 0


def _texts():
  """120 distinct texts of 1-95 characters, half English, half Chinese."""
  en = [("the quick brown fox %d " % i) * (1 + i % 4) for i in range(60)]
  zh = [("你好世界第%d句。" % i) * (1 + i % 7) for i in range(60)]
  return [t.strip() for t in en + zh]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  path = str(tmp_path_factory.mktemp("tfds"))
  builders.write_records("rlhf_text", [{"id": str(i), "text": t, "source": "test"}
                                       for i, t in enumerate(_texts())],
                         config="small", data_dir=path, fractions=(1.0, 0.0, 0.0))
  builders.write_records("rlhf_dialogues", [
      {"messages": [{"role": "user", "content": f"question {i}?"},
                    {"role": "assistant", "content": f"answer {i}" * (1 + i % 3)},
                    {"role": "user", "content": "和你"},
                    {"role": "assistant", "content": "好的" * (1 + i % 5)}]}
      for i in range(40)], config="small", data_dir=path, fractions=(1.0, 0.0, 0.0))
  return path


def make(data_dir, name="rlhf_text/small", **kwargs):
  args = dict(split="train", data_dir=data_dir, batch_size=4, seq_len=64,
              tokenize_fn=pipeline.byte_tokenize_fn, seed=0, read_block=8)
  args.update(kwargs)
  return pipeline.make_lm_iterator(name, **args)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def segments(batch):
  """The examples of a batch as byte strings, rebuilt from inputs and segment ids."""
  out = []
  for row_ids, row_seg in zip(batch["inputs"], batch["segment_ids"]):
    for s in range(1, row_seg.max() + 1):
      out.append(bytes((row_ids[row_seg == s] - 1).astype(np.uint8).tolist()))
  return out


# ---------------------------------------------------------------------------------------------


def test_batch_layout(data_dir):
  batch = next(make(data_dir))
  assert set(batch) == {"inputs", "targets", "positions", "segment_ids", "loss_mask"}
  for k, v in batch.items():
    assert v.shape == (4, 64), k
    assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
  assert (batch["segment_ids"] > 1).any()  # several examples share a row


def test_deterministic_for_a_seed(data_dir):
  assert_batches_equal(take(make(data_dir), 5), take(make(data_dir), 5))
  other = take(make(data_dir, seed=1), 5)
  assert any(not np.array_equal(a["inputs"], b["inputs"])
             for a, b in zip(take(make(data_dir), 5), other))


@pytest.mark.parametrize("pack", [True, False])
def test_resume_from_saved_state(data_dir, pack):
  # 120 examples, ~8-20 per batch: 40 batches cross several epoch and block boundaries.
  it = make(data_dir, pack=pack)
  reference = take(it, 40)
  for k in (0, 1, 3, 7, 19, 33):
    it = make(data_dir, pack=pack)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint holds
    stats = it.stats
    restored = make(data_dir, pack=pack)
    restored.set_state(state)
    assert restored.stats == stats
    assert_batches_equal(take(restored, 40 - k), reference[k:])


def test_process_shards_are_disjoint_and_cover_one_epoch(data_dir):
  shards = []
  for index in range(2):
    it = make(data_dir, batch_size=4, seq_len=512, num_epochs=1, process_index=index,
              process_count=2)
    batches = list(it)
    assert all(b["inputs"].shape == (2, 512) for b in batches)  # local share: 4 // 2 rows
    shards.append(collections.Counter(s for b in batches for s in segments(b)))
  assert not set(shards[0]) & set(shards[1])
  everything = shards[0] + shards[1]
  assert everything == collections.Counter(t.encode() for t in _texts())


def test_lang_repeat_repeats_a_language_within_one_epoch(data_dir):
  """data.lang_repeat 'zh:3': one epoch holds every Chinese text three times and every English
  text once (the half/half corpus above, languages guessed when written)."""
  it = make(data_dir, batch_size=4, seq_len=512, num_epochs=1,
            lang_repeat=pipeline.parse_lang_repeat("zh:3"))
  got = collections.Counter(s for b in it for s in segments(b))
  want = collections.Counter({t.encode(): 3 if "你" in t else 1 for t in _texts()})
  assert got == want
  for bad in ("zh", "zh:0", ":2", "zh:x"):
    with pytest.raises(ValueError, match="lang_repeat"):
      pipeline.parse_lang_repeat(bad)
  with pytest.raises(ValueError, match="no record has"):
    make(data_dir, num_epochs=1, lang_repeat={"fr": 2})


def test_truncation_is_counted(data_dir):
  it = make(data_dir, seq_len=16, num_epochs=1, shuffle=False)
  batches = list(it)
  long = sum(len(t.encode()) > 16 for t in _texts())
  assert it.stats["truncated"] == long > 0
  assert it.stats["examples"] == len(_texts())
  assert all(len(s) <= 16 for b in batches for s in segments(b))


def test_sft_loss_mask_is_shifted_and_stays_in_examples(data_dir):
  it = make(data_dir, name="rlhf_dialogues/small", seq_len=256, num_epochs=1)
  batches = list(it)
  assert it.stats["truncated"] == 0
  source = tfds.data_source("rlhf_dialogues/small", data_dir=data_dir, split="train")
  want = sum(int(pipeline.byte_tokenize_fn(pipeline.decode_record(r))[1][1:].sum())
             for r in source.__getitems__(range(len(source))))
  assert sum(float(b["loss_mask"].sum()) for b in batches) == want
  for b in batches:
    last = np.zeros_like(b["segment_ids"], bool)  # last token of each example
    last[:, :-1] = (b["segment_ids"][:, :-1] != b["segment_ids"][:, 1:])
    last[:, -1] = True
    assert (b["loss_mask"][last] == 0).all() and (b["targets"][last] == PAD).all()


def test_unpacked_mode_has_one_example_per_row(data_dir):
  batch = next(make(data_dir, pack=False))
  assert batch["segment_ids"].max(axis=1).tolist() == [1, 1, 1, 1]
  lengths = (batch["segment_ids"] > 0).sum(axis=1)
  for row, n in zip(batch["segment_ids"], lengths):  # right padding
    assert (row[:n] == 1).all() and (row[n:] == 0).all()


def test_empty_or_missing_split_names_dataset_and_split(data_dir):
  with pytest.raises(ValueError, match=r"rlhf_text/small.*test"):
    make(data_dir, split="test")
  with pytest.raises(ValueError, match="divisible"):
    make(data_dir, batch_size=3, process_count=2)


# ---------------------------------------------------------------------------------------------
# Packing against a plain-Python reference.


def reference_batches(examples, batch_size, seq_len, pack):
  """First-fit packing written the slow, obvious way, position by position."""
  batches, rows, truncated = [], [], 0

  def emit():
    out = {k: [[PAD if k in ("inputs", "targets") else 0] * seq_len for _ in range(batch_size)]
           for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    for r, row in enumerate(rows):
      t = 0
      for seg, (ids, mask) in enumerate(row, 1):
        for i in range(len(ids)):
          out["inputs"][r][t] = ids[i]
          out["positions"][r][t] = i
          out["segment_ids"][r][t] = seg
          if i + 1 < len(ids):
            out["targets"][r][t] = ids[i + 1]
            out["loss_mask"][r][t] = mask[i + 1]
          t += 1
    batches.append({k: np.array(v, np.float32 if k == "loss_mask" else np.int32)
                    for k, v in out.items()})

  for ids, mask in examples:
    if len(ids) > seq_len:
      truncated += 1
      ids, mask = ids[:seq_len], mask[:seq_len]
    while True:
      free = [r for r, row in enumerate(rows)
              if pack and sum(len(x) for x, _ in row) + len(ids) <= seq_len]
      if free:
        rows[free[0]].append((ids, mask))
        break
      if len(rows) < batch_size:
        rows.append([(ids, mask)])
        break
      emit()
      rows = []
  if rows:
    emit()
  return batches, truncated


def random_examples(n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.choice([1, 2, 3, 5, 8, 13, 20, 31, 40, 45]))
    out.append((rng.integers(1, 50, length).tolist(), rng.integers(0, 2, length).tolist()))
  return out


def packed(examples, block, **kwargs):
  blocks = [[(np.array(i, np.int32), np.array(m, np.int32)) for i, m in examples[s:s + block]]
            for s in range(0, len(examples), block)]
  parent = grain.MapDataset.source(blocks).to_iter_dataset()
  return iter(pipeline.PackedBatchIterDataset(parent, **kwargs))


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_packing_matches_reference(pack, seed):
  examples = random_examples(150, seed)
  want, truncated = reference_batches(examples, 3, 32, pack)
  it = packed(examples, 7, batch_size=3, seq_len=32, pack=pack)
  got = list(it)
  assert_batches_equal(got, want)
  assert it.stats["truncated"] == truncated > 0
  assert it.stats["examples"] == len(examples)
  # Resuming from the state after every batch gives the rest exactly.
  for k in range(0, len(want), 5):
    it = packed(examples, 7, batch_size=3, seq_len=32, pack=pack)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    restored = packed(examples, 7, batch_size=3, seq_len=32, pack=pack)
    restored.set_state(state)
    assert_batches_equal(list(restored), want[k:])


def test_empty_examples_are_skipped_and_counted():
  examples = [([], []), ([1, 2, 3], [1, 1, 1]), ([], [])]
  it = packed(examples, 2, batch_size=1, seq_len=8)
  (batch,) = list(it)
  assert batch["inputs"][0, :3].tolist() == [1, 2, 3]
  assert it.stats["empty"] == 2 and it.stats["examples"] == 1


def test_record_iterator_resumes_and_shards(data_dir):
  def make_records(**kwargs):
    args = dict(split="train", data_dir=data_dir, batch_size=6, seed=0)
    args.update(kwargs)
    return pipeline.make_record_iterator("rlhf_text/small", **args)

  it = make_records()
  first = take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  rest = take(it, 30)  # crosses epochs: 120 records, 6 a batch
  restored = make_records()
  restored.set_state(state)
  assert take(restored, 30) == rest
  assert take(make_records(), 3) == first
  assert all(len(b) == 6 and set(b[0]) == {"id", "text", "lang", "source"} for b in first)
  shards = [[r["id"] for b in make_records(batch_size=4, process_index=i, process_count=2,
                                           num_epochs=1, drop_remainder=False) for r in b]
            for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(str(i) for i in range(len(_texts())))
