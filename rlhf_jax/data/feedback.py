r"""Conversations and the likes / dislikes people give answers, stored in SQLite; export to TFDS.

The chat front ends (`rlhf_jax.chat.terminal` in a terminal, `rlhf_jax.chat.server` on a web
page) write here, and the KTO trainer reads what `export` makes of it. The database lives at
`<workdir>/feedback/feedback.sqlite`:

  conversations  id (random hex), created, lang
  messages       id, conversation_id, role (user / assistant / system), content,
                 checkpoint_step and checkpoint_dir (the model that wrote an assistant answer),
                 created
  feedback       id, message_id (an assistant message; a trigger refuses any other), label
                 (like / dislike), created, event_id (optional, UNIQUE)

Nothing lost: WAL journal with synchronous=FULL, and every event (a new conversation, one
message, one click) is one transaction that has committed -- and reached the disk -- before the
method returns, so a caller that acknowledges after the call never acknowledges a lost event,
even if the process is killed right after. Nothing duplicated: a client that retries a click it
got no answer for sends the same `event_id`, and the retry returns the first click's id instead
of adding a row. One connection is shared by the threads of a process behind a lock (SQLite
writes one transaction at a time anyway); other processes (a terminal chat next to the web
server) wait on the file lock for up to `busy_timeout`.

Private: the directory is created 0700 and the database 0600 (SQLite gives its -wal and -shm
files the database's mode), since conversations are whatever people typed.

Export: the latest label of each answer wins (a like later changed to a dislike counts as a
dislike). The record's `prompt` is the last user turn before the answer, as in the bundled
feedback (rlhf_feedback holds single-turn records; earlier turns are not exported).

  python -m rlhf_jax.data.feedback export --workdir=W [--data_dir=W/tfds] [--config=chat]
  python -m rlhf_jax.data.feedback stats --workdir=W
"""
from __future__ import annotations

import collections
import datetime
import os
import sqlite3
import sys
import threading
import uuid
from typing import Any, Optional

from rlhf_jax.core.langs import LANGS
from rlhf_jax.data import builders
from rlhf_jax.core.logs import setup_logging

LABELS = ("like", "dislike")
ROLES = ("system", "user", "assistant")
DEFAULT_EXPORT_CONFIG = "chat"
MAX_EVENT_ID_CHARS = 200
MAX_ROW_ID = 2**63 - 1  # SQLite's INTEGER PRIMARY KEY range; a larger id cannot be stored

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
  id      TEXT PRIMARY KEY,
  created TEXT NOT NULL,
  lang    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
  id              INTEGER PRIMARY KEY AUTOINCREMENT,
  conversation_id TEXT NOT NULL REFERENCES conversations(id),
  role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
  content         TEXT NOT NULL,
  checkpoint_step INTEGER,
  checkpoint_dir  TEXT,
  created         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE TABLE IF NOT EXISTS feedback (
  id         INTEGER PRIMARY KEY AUTOINCREMENT,
  message_id INTEGER NOT NULL REFERENCES messages(id),
  label      TEXT NOT NULL CHECK (label IN ('like', 'dislike')),
  created    TEXT NOT NULL,
  event_id   TEXT UNIQUE
);
CREATE INDEX IF NOT EXISTS feedback_by_message ON feedback(message_id, id);
CREATE TRIGGER IF NOT EXISTS feedback_on_answers_only
BEFORE INSERT ON feedback
WHEN (SELECT role FROM messages WHERE id = NEW.message_id) IS NOT 'assistant'
BEGIN
  SELECT RAISE(ABORT, 'feedback must refer to an assistant message');
END;
"""


class NotFoundError(LookupError):
  """An id (conversation or message) that is not in the store."""


class ConflictError(ValueError):
  """An event_id reused for a different click."""


def default_path(workdir: str) -> str:
  """Where a workdir keeps its feedback database."""
  return os.path.join(workdir, "feedback", "feedback.sqlite")


def create_private(path: str) -> None:
  """Makes the database's directory (0700) and an empty database file (0600) when missing: left
  to SQLite, the umask decides (often world-readable). An empty file is a valid empty database;
  an existing directory or file keeps its mode, the owner's choice."""
  directory = os.path.dirname(path)
  if not os.path.isdir(directory):
    os.makedirs(directory, mode=0o700, exist_ok=True)  # the mode is the leaf's
  try:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
  except FileExistsError:
    pass  # another process made it first


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def check_row_id(message_id: Any) -> None:
  """ValueError unless `message_id` is an int SQLite can hold (JSON's 1e30 is a float, and
  10**30 an int that does not fit a 64-bit row id)."""
  if isinstance(message_id, bool) or not isinstance(message_id, int):
    raise ValueError(f"message_id must be an integer, got {repr(message_id)[:80]}")
  if not 1 <= message_id <= MAX_ROW_ID:
    # Not the digits: str() of a huge int is slow, and refused past 4300 digits.
    got = (message_id if message_id.bit_length() <= 64
           else f"an integer of {message_id.bit_length()} bits")
    raise ValueError(f"message_id must be between 1 and {MAX_ROW_ID}, got {got}")


class FeedbackStoreError(ValueError):
  """A database file that SQLite cannot read (another kind of file, or corrupted)."""


class FeedbackStore:
  """The SQLite store of the module docstring. Safe to share between threads."""

  def __init__(self, path: str, busy_timeout_ms: int = 30_000):
    self.path = os.path.abspath(path)
    create_private(self.path)
    self._lock = threading.RLock()
    # isolation_level=None: no implicit transactions; every write opens its own BEGIN IMMEDIATE.
    self._db = sqlite3.connect(self.path, timeout=busy_timeout_ms / 1000,
                               isolation_level=None, check_same_thread=False)
    self._db.row_factory = sqlite3.Row
    self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    try:  # the first statement that reads the file: a file that is not a database fails here
      mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    except sqlite3.DatabaseError as e:
      self._db.close()
      raise FeedbackStoreError(f"{self.path}: not a feedback database ({e})") from None
    if mode.lower() != "wal":
      raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); is the file on "
                         "a network filesystem?")
    self._db.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
    self._db.execute("PRAGMA foreign_keys = ON")
    with self._lock:
      version = self._db.execute("PRAGMA user_version").fetchone()[0]
      if version > _SCHEMA_VERSION:
        raise RuntimeError(f"{self.path} has schema version {version}, newer than this code's "
                           f"{_SCHEMA_VERSION}: update rlhf_jax")
      # One transaction, so two processes opening a new file at once cannot interleave.
      self._db.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\n"
                             f"PRAGMA user_version = {_SCHEMA_VERSION};\nCOMMIT;")

  # ---------------------------------------------------------------------------- transactions

  class _Transaction:
    def __init__(self, store: "FeedbackStore"):
      self.store = store

    def __enter__(self) -> sqlite3.Connection:
      self.store._lock.acquire()
      try:
        self.store._db.execute("BEGIN IMMEDIATE")  # take the write lock now, not mid-way
      except BaseException:
        self.store._lock.release()
        raise
      return self.store._db

    def __exit__(self, kind, value, traceback):
      try:
        self.store._db.execute("COMMIT" if kind is None else "ROLLBACK")
      finally:
        self.store._lock.release()
      return False

  def _transaction(self) -> "_Transaction":
    return FeedbackStore._Transaction(self)

  def _read(self, sql: str, args=()) -> list[sqlite3.Row]:
    with self._lock:
      return self._db.execute(sql, args).fetchall()

  def close(self) -> None:
    with self._lock:
      self._db.close()

  def __enter__(self) -> "FeedbackStore":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # ---------------------------------------------------------------------------------- events

  def start_conversation(self, lang: str = "en") -> str:
    """A new conversation's id (random hex: clients cannot guess each other's)."""
    if lang not in LANGS:
      raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
    conversation_id = uuid.uuid4().hex
    with self._transaction() as db:
      db.execute("INSERT INTO conversations (id, created, lang) VALUES (?, ?, ?)",
                 (conversation_id, _now(), lang))
    return conversation_id

  def add_message(self, conversation_id: str, role: str, content: str, *,
                  checkpoint_step: Optional[int] = None,
                  checkpoint_dir: Optional[str] = None) -> int:
    """Appends one message; returns its id. NotFoundError for an unknown conversation."""
    if role not in ROLES:
      raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(content, str):
      raise ValueError(f"message content must be a string, got {type(content).__name__}")
    with self._transaction() as db:
      if db.execute("SELECT 1 FROM conversations WHERE id = ?",
                    (str(conversation_id),)).fetchone() is None:
        raise NotFoundError(f"unknown conversation id {conversation_id!r}")
      cursor = db.execute(
          "INSERT INTO messages (conversation_id, role, content, checkpoint_step, checkpoint_dir,"
          " created) VALUES (?, ?, ?, ?, ?, ?)",
          (str(conversation_id), role, content,
           None if checkpoint_step is None else int(checkpoint_step), checkpoint_dir, _now()))
      return int(cursor.lastrowid)

  def add_feedback(self, message_id: int, label: str, event_id: Optional[str] = None, *,
                   conversation_id: Optional[str] = None) -> int:
    """Records a like or dislike of an assistant message; returns the feedback id.

    With an `event_id` already recorded for the same message and label, returns that record's
    id and adds nothing (a retried click); the same event_id with another message or label is
    a ConflictError. With a `conversation_id`, the message must be one of that conversation's
    (else NotFoundError, worded like an unknown id so a client learns nothing of other
    conversations): a web client may rate only the answers it was given.
    """
    if label not in LABELS:
      raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    check_row_id(message_id)
    if conversation_id is not None and not isinstance(conversation_id, str):
      raise ValueError(f"conversation_id must be a string, got {type(conversation_id).__name__}")
    if event_id is not None:
      if not isinstance(event_id, str) or not event_id or len(event_id) > MAX_EVENT_ID_CHARS:
        raise ValueError(f"event_id must be a non-empty string of at most {MAX_EVENT_ID_CHARS} "
                         f"characters, got {str(event_id)[:60]!r}")
    with self._transaction() as db:
      if conversation_id is not None and db.execute(
          "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?",
          (message_id, conversation_id)).fetchone() is None:
        raise NotFoundError(f"unknown message id {message_id} in conversation "
                            f"{conversation_id[:80]!r}")
      if event_id is not None:
        seen = db.execute("SELECT id, message_id, label FROM feedback WHERE event_id = ?",
                          (event_id,)).fetchone()
        if seen is not None:
          if (seen["message_id"], seen["label"]) != (message_id, label):
            raise ConflictError(
                f"event_id {event_id!r} was already used for a {seen['label']} of message "
                f"{seen['message_id']}")
          return int(seen["id"])
      row = db.execute("SELECT role FROM messages WHERE id = ?", (message_id,)).fetchone()
      if row is None:
        raise NotFoundError(f"unknown message id {message_id}")
      if row["role"] != "assistant":
        raise ValueError(f"message {message_id} is a {row['role']} message: only answers "
                         "(assistant messages) take a like or dislike")
      cursor = db.execute(
          "INSERT INTO feedback (message_id, label, created, event_id) VALUES (?, ?, ?, ?)",
          (message_id, label, _now(), event_id))
      return int(cursor.lastrowid)

  # ----------------------------------------------------------------------------------- reads

  def conversation_ids(self) -> list[str]:
    """Every conversation's id, oldest first."""
    return [r["id"] for r in self._read("SELECT id FROM conversations ORDER BY rowid")]

  def has_conversation(self, conversation_id: str) -> bool:
    return bool(self._read("SELECT 1 FROM conversations WHERE id = ?", (str(conversation_id),)))

  def conversation(self, conversation_id: str) -> dict[str, Any]:
    """{id, created, lang, messages: [{id, role, content, checkpoint_step, checkpoint_dir,
    created, label}]}, `label` being an answer's latest like / dislike (None if none)."""
    head = self._read("SELECT id, created, lang FROM conversations WHERE id = ?",
                      (str(conversation_id),))
    if not head:
      raise NotFoundError(f"unknown conversation id {conversation_id!r}")
    rows = self._read(
        "SELECT m.*, (SELECT label FROM feedback f WHERE f.message_id = m.id "
        "             ORDER BY f.id DESC LIMIT 1) AS label "
        "FROM messages m WHERE m.conversation_id = ? ORDER BY m.id", (str(conversation_id),))
    return {**dict(head[0]), "messages": [dict(r) for r in rows]}

  def history(self, conversation_id: str) -> list[dict[str, str]]:
    """[{role, content}] of a conversation, oldest first: what the model is prompted with."""
    return [{"role": m["role"], "content": m["content"]}
            for m in self.conversation(conversation_id)["messages"]]

  def message(self, message_id: int) -> dict[str, Any]:
    rows = self._read("SELECT * FROM messages WHERE id = ?", (message_id,))
    if not rows:
      raise NotFoundError(f"unknown message id {message_id}")
    return dict(rows[0])

  def feedback_rows(self) -> list[dict[str, Any]]:
    """Every feedback event, oldest first."""
    return [dict(r) for r in self._read("SELECT * FROM feedback ORDER BY id")]

  def latest_labels(self) -> list[dict[str, Any]]:
    """One row per rated answer, its latest label: {message_id, label, feedback_id, events}."""
    rows = self._read(
        "SELECT f.message_id, f.label, f.id AS feedback_id, "
        "       (SELECT COUNT(*) FROM feedback g WHERE g.message_id = f.message_id) AS events "
        "FROM feedback f "
        "WHERE f.id = (SELECT MAX(id) FROM feedback g WHERE g.message_id = f.message_id) "
        "ORDER BY f.message_id")
    return [dict(r) for r in rows]

  def counts(self) -> dict[str, int]:
    (row,) = self._read(
        "SELECT (SELECT COUNT(*) FROM conversations) AS conversations, "
        "       (SELECT COUNT(*) FROM messages WHERE role = 'user') AS user_messages, "
        "       (SELECT COUNT(*) FROM messages WHERE role = 'assistant') AS answers, "
        "       (SELECT COUNT(*) FROM feedback) AS feedback_events")
    return dict(row)


# ------------------------------------------------------------------------------------- export


def feedback_records(store: FeedbackStore) -> tuple[list[dict[str, Any]], collections.Counter]:
  """rlhf_feedback records {id, prompt, response, label, lang, source} of every rated answer
  (latest label wins), and a Counter of what was skipped, keyed by the reason."""
  records, skipped = [], collections.Counter()
  conversations: dict[str, dict] = {}
  for rated in store.latest_labels():
    message = store.message(rated["message_id"])
    cid = message["conversation_id"]
    if cid not in conversations:
      conversations[cid] = store.conversation(cid)
    conv = conversations[cid]
    before = [m for m in conv["messages"] if m["id"] < message["id"]]
    users = [m for m in before if m["role"] == "user"]
    if not users:
      skipped["no user turn before the answer"] += 1
      continue
    prompt, response = users[-1]["content"], message["content"]
    if not prompt.strip():
      skipped["empty prompt"] += 1
      continue
    if not response.strip():
      skipped["empty answer"] += 1
      continue
    records.append({
        "id": f"chat-{message['id']}",
        "prompt": prompt,
        "response": response,
        "label": 1 if rated["label"] == "like" else 0,
        "lang": conv["lang"],
        "source": "chat",
    })
  return records, skipped


def export(workdir: str, data_dir: str = "", config: str = DEFAULT_EXPORT_CONFIG,
           out=sys.stdout) -> dict[str, Any]:
  """Writes `rlhf_feedback/<config>` into data_dir (default `<workdir>/tfds`), replacing an
  earlier export of the same name. Returns the counts it prints."""
  path = default_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no feedback database at {path}: chat with rlhf_jax.chat.terminal or "
                            "rlhf_jax.chat.server in this workdir first")
  with FeedbackStore(path) as store:
    records, skipped = feedback_records(store)
  likes = sum(r["label"] for r in records)
  counts = {"exported": len(records), "likes": likes, "dislikes": len(records) - likes,
            "skipped": sum(skipped.values()), "skipped_by_reason": dict(skipped)}
  if not records:
    print(f"nothing to export from {path}: no rated answers "
          f"(skipped {counts['skipped']}: {dict(skipped)})", file=out)
    return {**counts, "path": None}
  data_dir = data_dir or os.path.join(workdir, "tfds")
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  where = builders.write_records("rlhf_feedback", records, config=config, data_dir=data_dir,
                                 overwrite=True,
                                 description=f"likes and dislikes collected in {workdir}")
  print(f"exported {counts['exported']} answers ({likes} likes, {counts['dislikes']} dislikes) "
        f"to {where}", file=out)
  print(f"skipped {counts['skipped']}" + "".join(f"\n  {n}: {reason}"
                                                 for reason, n in sorted(skipped.items())),
        file=out)
  print(f"train on it with data.name=rlhf_feedback/{config} data.data_dir={data_dir}", file=out)
  return {**counts, "path": where}


def stats(workdir: str, out=sys.stdout) -> dict[str, Any]:
  """Counts of the store, and of rated answers by label, language and checkpoint step."""
  path = default_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no feedback database at {path}")
  with FeedbackStore(path) as store:
    counts = store.counts()
    by_label, by_lang, by_step = (collections.Counter() for _ in range(3))
    for rated in store.latest_labels():
      message = store.message(rated["message_id"])
      lang = store.conversation(message["conversation_id"])["lang"]
      by_label[rated["label"]] += 1
      by_lang[f"{lang}/{rated['label']}"] += 1
      by_step[f"step {message['checkpoint_step']}/{rated['label']}"] += 1
  result = {**counts, "rated_answers": sum(by_label.values()), "by_label": dict(by_label),
            "by_lang": dict(sorted(by_lang.items())),
            "by_checkpoint": dict(sorted(by_step.items()))}
  print(f"{path}", file=out)
  for key, value in result.items():
    print(f"  {key}: {value}", file=out)
  return result


def main(argv) -> None:
  from absl import app
  setup_logging()
  commands = {"export": lambda: export(_WORKDIR.value, _DATA_DIR.value, _CONFIG.value),
              "stats": lambda: stats(_WORKDIR.value)}
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f"usage: python -m rlhf_jax.data.feedback {{{'|'.join(commands)}}} "
                      "--workdir=W [--data_dir=D] [--config=NAME]")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  result = commands[argv[1]]()
  if argv[1] == "export" and not result["exported"]:
    sys.exit(1)


if __name__ == "__main__":
  from absl import app, flags
  _WORKDIR = flags.DEFINE_string("workdir", "", "The workdir holding feedback/feedback.sqlite.")
  _DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir ('' = <workdir>/tfds).")
  _CONFIG = flags.DEFINE_string("config", DEFAULT_EXPORT_CONFIG,
                                "Export as rlhf_feedback/<config>.")
  app.run(main)
