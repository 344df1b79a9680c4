"""The SQLite feedback store: events round-trip, a retried click (same event_id) is counted once,
only answers take feedback, feedback naming a conversation must be on one of its answers, ids
out of SQLite's range are refused, the database is private (0600 in a 0700 directory), writers
on two connections at once lose nothing, and the export
turns the latest label of every answer into rlhf_feedback/<config> rows that load back from
TFDS equal to what was inserted (and the CLI prints the counts)."""
import os
import sqlite3
import stat
import subprocess
import sys
import threading

import pytest

from rlhf_jax.data import feedback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _store(tmp_path):
  return feedback.FeedbackStore(feedback.default_path(str(tmp_path)))


def test_events_round_trip(tmp_path):
  with _store(tmp_path) as store:
    cid = store.start_conversation("zh")
    user = store.add_message(cid, "user", "你好 <b>")
    answer = store.add_message(cid, "assistant", "你好！", checkpoint_step=7,
                               checkpoint_dir="/runs/sft/checkpoints")
    first = store.add_feedback(answer, "like")
    second = store.add_feedback(answer, "dislike")
    conv = store.conversation(cid)
  assert os.path.isfile(tmp_path / "feedback" / "feedback.sqlite")
  assert conv["id"] == cid and conv["lang"] == "zh"
  got = [(m["id"], m["role"], m["content"], m["checkpoint_step"], m["checkpoint_dir"], m["label"])
         for m in conv["messages"]]
  assert got == [(user, "user", "你好 <b>", None, None, None),
                 (answer, "assistant", "你好！", 7, "/runs/sft/checkpoints", "dislike")]
  assert second > first
  # A new connection (another process) sees the same, in WAL mode.
  db = sqlite3.connect(feedback.default_path(str(tmp_path)))
  assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  assert db.execute("SELECT message_id, label FROM feedback ORDER BY id").fetchall() == [
      (answer, "like"), (answer, "dislike")]
  db.close()


def test_event_id_makes_a_retry_count_once(tmp_path):
  with _store(tmp_path) as store:
    cid = store.start_conversation()
    store.add_message(cid, "user", "q")
    answer = store.add_message(cid, "assistant", "a")
    other = store.add_message(cid, "assistant", "b")
    first = store.add_feedback(answer, "like", event_id="click-1")
    assert store.add_feedback(answer, "like", event_id="click-1") == first
    with pytest.raises(feedback.ConflictError, match="click-1"):
      store.add_feedback(answer, "dislike", event_id="click-1")
    with pytest.raises(feedback.ConflictError):
      store.add_feedback(other, "like", event_id="click-1")
    assert store.add_feedback(answer, "like", event_id="click-2") != first
    assert [(r["message_id"], r["event_id"]) for r in store.feedback_rows()] == [
        (answer, "click-1"), (answer, "click-2")]


def test_only_answers_take_feedback_and_bad_input_is_refused(tmp_path):
  with _store(tmp_path) as store:
    cid = store.start_conversation()
    user = store.add_message(cid, "user", "q")
    with pytest.raises(ValueError, match="user message"):
      store.add_feedback(user, "like")
    with pytest.raises(feedback.NotFoundError, match="unknown message id 999"):
      store.add_feedback(999, "like")
    with pytest.raises(ValueError, match="label"):
      store.add_feedback(user, "love")
    with pytest.raises(feedback.NotFoundError, match="unknown conversation"):
      store.add_message("nope", "user", "q")
    with pytest.raises(ValueError, match="lang"):
      store.start_conversation("fr")
    assert store.feedback_rows() == []
  # The database itself refuses feedback on a non-answer, whoever writes it.
  db = sqlite3.connect(feedback.default_path(str(tmp_path)))
  with pytest.raises(sqlite3.IntegrityError, match="assistant"):
    db.execute("INSERT INTO feedback (message_id, label, created) VALUES (?, 'like', 'now')",
               (user,))
  db.close()


def test_feedback_checked_against_its_conversation_and_ids_in_range(tmp_path):
  with _store(tmp_path) as store:
    mine, theirs = store.start_conversation(), store.start_conversation()
    store.add_message(mine, "user", "q")
    answer = store.add_message(mine, "assistant", "a")
    with pytest.raises(feedback.NotFoundError,
                       match=f"unknown message id {answer} in conversation '{theirs}'"):
      store.add_feedback(answer, "like", conversation_id=theirs)
    with pytest.raises(feedback.NotFoundError, match="unknown message id 999 in conversation"):
      store.add_feedback(999, "like", conversation_id=mine)
    # The check comes first: a retry's event_id does not get a click past it.
    store.add_feedback(answer, "like", "e1", conversation_id=mine)
    with pytest.raises(feedback.NotFoundError):
      store.add_feedback(answer, "like", "e1", conversation_id=theirs)
    # Ids SQLite cannot hold are refused before the database sees them (which would raise
    # OverflowError); 2**63 - 1 is the largest it holds.
    for bad in (0, -1, 2**63, 10**30, 10**5000):
      with pytest.raises(ValueError, match="message_id must be between 1 and"):
        store.add_feedback(bad, "like", conversation_id=mine)
    for bad in (1e30, 1.0, True, "1"):
      with pytest.raises(ValueError, match="message_id must be an integer"):
        store.add_feedback(bad, "like")
    with pytest.raises(feedback.NotFoundError, match="unknown message id"):
      store.add_feedback(2**63 - 1, "like")
    assert [(r["message_id"], r["event_id"]) for r in store.feedback_rows()] == [(answer, "e1")]


def test_database_is_private(tmp_path):
  """feedback/ is made 0700 and the database 0600, and SQLite's WAL and shared-memory files
  follow the database's mode: under the usual umask 022, SQLite alone would make them 0644."""
  old = os.umask(0o022)
  try:
    with _store(tmp_path / "w") as store:
      store.start_conversation()  # a write: the -wal and -shm files exist while it is open
      directory = tmp_path / "w" / "feedback"
      modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in directory.iterdir()}
      dir_mode = stat.S_IMODE(os.stat(directory).st_mode)
  finally:
    os.umask(old)
  assert dir_mode == 0o700
  assert modes == {"feedback.sqlite": 0o600, "feedback.sqlite-wal": 0o600,
                   "feedback.sqlite-shm": 0o600}


def test_two_connections_writing_at_once_lose_nothing(tmp_path):
  """Like the web server and a terminal chat on one workdir: 2 stores x 4 threads x 25 clicks,
  each click also retried once; every click lands exactly once."""
  with _store(tmp_path) as setup:
    cid = setup.start_conversation()
    setup.add_message(cid, "user", "q")
    answers = [setup.add_message(cid, "assistant", f"a{i}") for i in range(5)]
  stores = [_store(tmp_path), _store(tmp_path)]
  ids, errors = [], []

  def click(store, worker):
    try:
      for i in range(25):
        event = f"w{worker}-{i}"
        label = feedback.LABELS[i % 2]
        first = store.add_feedback(answers[i % 5], label, event_id=event)
        assert store.add_feedback(answers[i % 5], label, event_id=event) == first
        ids.append(first)
    except Exception as e:  # noqa: BLE001 -- reported below
      errors.append(e)

  threads = [threading.Thread(target=click, args=(stores[w % 2], w)) for w in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  rows = stores[0].feedback_rows()
  for store in stores:
    store.close()
  assert len(ids) == len(set(ids)) == 200
  assert sorted(r["id"] for r in rows) == sorted(ids)
  assert sorted(r["event_id"] for r in rows) == sorted(f"w{w}-{i}" for w in range(8)
                                                       for i in range(25))


def _fill(store):
  """A few conversations and clicks; returns the expected rlhf_feedback rows by id, worked out
  by replaying the clicks in order (a later click on an answer replaces an earlier one)."""
  en = store.start_conversation("en")
  zh = store.start_conversation("zh")
  odd = store.start_conversation("en")
  messages = {}
  for name, cid, role, text in [
      ("u1", en, "user", "Hi there"), ("a1", en, "assistant", "Hello!"),
      ("u2", en, "user", "How are you?"), ("a2", en, "assistant", "Fine, <i>thanks</i>."),
      ("u3", zh, "user", "你好"), ("a3", zh, "assistant", "你好！很高兴见到你。"),
      ("u4", zh, "user", "再见"), ("a4", zh, "assistant", "再见"),  # never rated
      ("a5", odd, "assistant", "A greeting before anyone spoke"),
      ("u6", odd, "user", "hm"), ("a6", odd, "assistant", "   ")]:
    messages[name] = (store.add_message(cid, role, text, checkpoint_step=3), cid, text)
  clicks = [("a1", "like"), ("a2", "like"), ("a1", "dislike"), ("a3", "dislike"),
            ("a5", "like"), ("a6", "dislike"), ("a3", "like"), ("a3", "dislike")]
  latest = {}
  for name, label in clicks:
    store.add_feedback(messages[name][0], label)
    latest[name] = label
  prompts = {"a1": "Hi there", "a2": "How are you?", "a3": "你好"}
  langs = {"a1": "en", "a2": "en", "a3": "zh"}
  expected = {f"chat-{messages[n][0]}": {"prompt": prompts[n], "response": messages[n][2],
                                         "label": int(latest[n] == "like"), "lang": langs[n],
                                         "source": "chat"} for n in prompts}
  return expected, messages


def _read_tfds(name, data_dir):
  import tensorflow_datasets as tfds
  from rlhf_jax.data import pipeline
  rows = {}
  for split in tfds.builder(name, data_dir=data_dir).info.splits:
    source = tfds.data_source(name, data_dir=data_dir, split=split)
    for record in source.__getitems__(range(len(source))):
      record = pipeline.decode_record(record)
      key = record.pop("id")
      rows[key] = dict(record, split=split)
  return rows


def test_export_latest_label_wins_and_loads_back_from_tfds(tmp_path):
  from rlhf_jax.data import builders
  workdir, data_dir = tmp_path / "w", tmp_path / "tfds"
  with _store(workdir) as store:
    expected, messages = _fill(store)
  out = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.data.feedback", "export", f"--workdir={workdir}",
       f"--data_dir={data_dir}", "--config=mine"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "exported 3 answers (1 likes, 2 dislikes)" in out.stdout
  assert "1: no user turn before the answer" in out.stdout
  assert "1: empty answer" in out.stdout
  rows = _read_tfds("rlhf_feedback/mine", str(data_dir))
  assert {i: {k: v for k, v in r.items() if k != "split"} for i, r in rows.items()} == expected
  for record in rows.values():  # the bundled data's hashed splits, keyed by the prompt
    assert record["split"] == builders.assign_split(record["prompt"])

  # More clicks, then export again: the dataset is replaced, a2 now a dislike.
  with _store(workdir) as store:
    store.add_feedback(messages["a2"][0], "dislike")
  counts = feedback.export(str(workdir), str(data_dir), "mine", out=open(os.devnull, "w"))
  assert (counts["exported"], counts["likes"], counts["dislikes"]) == (3, 0, 3)
  rows = _read_tfds("rlhf_feedback/mine", str(data_dir))
  assert rows[f"chat-{messages['a2'][0]}"]["label"] == 0

  stats = subprocess.run([sys.executable, "-m", "rlhf_jax.data.feedback", "stats",
                          f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
  assert stats.returncode == 0, stats.stderr[-2000:]
  assert "feedback_events: 9" in stats.stdout and "rated_answers: 5" in stats.stdout


def test_export_of_an_empty_store_says_so(tmp_path):
  with _store(tmp_path):
    pass
  with pytest.raises(FileNotFoundError, match="no feedback database"):
    feedback.export(str(tmp_path / "elsewhere"))
  counts = feedback.export(str(tmp_path), str(tmp_path / "tfds"), out=open(os.devnull, "w"))
  assert counts["exported"] == 0 and counts["path"] is None
  assert not os.path.exists(tmp_path / "tfds")
