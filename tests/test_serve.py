"""The web server's JSON API, with a real tiny model: a chat round trip, every kind of bad
request answered with a 4xx and a clear message (and the server still answering after it),
feedback refused on an answer of another conversation, hostile JSON (100000 levels deep,
out-of-range ids) refused with a 4xx, a half-sent body dropped after the socket timeout while
others are served, idle connections past the cap refused with a 503 and threads bounded,
200 concurrent feedback posts from 20 clients all landing once, feedback not waiting for the
model, and a server killed mid-traffic keeping every feedback it acknowledged."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import pytest

from helpers import write_policy_run
from rlhf_jax.chat import model_choice as chat_model, server as serve
from rlhf_jax.infer import answers as respond
from rlhf_jax.text import tokenizer as tok_lib
from rlhf_jax.data import feedback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_CHARS = 50
MAX_BODY = 4096


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled_tokenizer):
  run = str(tmp_path_factory.mktemp("run") / "sft")
  vocab = tok_lib.Tokenizer.load(bundled_tokenizer).vocab_size
  write_policy_run(run, bundled_tokenizer, vocab, step=3, steps=3, scale=0.3)
  return run


@pytest.fixture(scope="module")
def server(tmp_path_factory, run_dir):
  """(base host, port, service) of a server on a free loopback port, in a thread."""
  workdir = str(tmp_path_factory.mktemp("serve"))
  model = chat_model.load_chat_model(workdir, run_dir,
                                     chat_model.Generation(max_new_tokens=6, greedy=True))
  store = feedback.FeedbackStore(feedback.default_path(workdir))
  service = serve.ChatService(model, store, max_message_chars=MAX_CHARS)
  httpd = serve.make_server(service, "127.0.0.1", 0, max_body_bytes=MAX_BODY)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd.server_address[1], service
  httpd.shutdown()
  httpd.server_close()
  store.close()


def call(port, method, path, body=None, *, raw=None, content_type="application/json",
         headers=None, timeout=60):
  """(status, decoded JSON) of one request on a fresh connection."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  all_headers = {"Content-Type": content_type} if data is not None else {}
  all_headers.update(headers or {})
  try:
    conn.request(method, path, body=data, headers=all_headers)
    response = conn.getresponse()
    payload = response.read()
    return response.status, json.loads(payload) if payload else None
  finally:
    conn.close()


def test_chat_round_trip(server):
  port, service = server
  status, health = call(port, "GET", "/api/health")
  assert status == 200 and health["status"] == "ok" and health["checkpoint_step"] == 3
  status, first = call(port, "POST", "/api/chat", {"message": "Hello there!", "lang": "en"})
  assert status == 200, first
  model = service.model
  conversation = [{"role": "user", "content": "Hello there!"}]
  reference = "".join(respond.stream_answer(model.params, model.model_config, model.tokenizer,
                                            conversation, rng=jax.random.key(0),
                                            max_new_tokens=6, greedy=True))
  assert first["answer"] == reference and first["checkpoint_step"] == 3
  status, second = call(port, "POST", "/api/chat", {
      "conversation_id": first["conversation_id"], "message": "你好"})
  assert status == 200 and second["conversation_id"] == first["conversation_id"]
  status, conv = call(port, "GET", f"/api/conversations/{first['conversation_id']}")
  assert status == 200 and conv["lang"] == "en"
  assert [(m["message_id"], m["role"], m["content"]) for m in conv["messages"]] == [
      (first["user_message_id"], "user", "Hello there!"),
      (first["message_id"], "assistant", first["answer"]),
      (second["user_message_id"], "user", "你好"),
      (second["message_id"], "assistant", second["answer"])]
  status, fb = call(port, "POST", "/api/feedback", {"conversation_id": second["conversation_id"],
                                                    "message_id": second["message_id"],
                                                    "label": "like"})
  assert status == 200 and fb["feedback_id"] > 0
  status, conv = call(port, "GET", f"/api/conversations/{first['conversation_id']}")
  assert [m["label"] for m in conv["messages"]] == [None, None, None, "like"]
  status, page = call(port, "GET", "/api/conversations/" + "0" * 32)
  assert status == 404 and "unknown conversation id" in page["error"]


def _rows(service):
  return service.store.counts()


NOBODY = "0" * 32  # a conversation id no conversation has
BAD_REQUESTS = [
    # (method, path, body or raw bytes, extra request options, status, words in the error)
    ("POST", "/api/chat", {"message": ""}, {}, 400, "message is empty"),
    ("POST", "/api/chat", {"message": " \n\t "}, {}, 400, "message is empty"),
    ("POST", "/api/chat", {"message": "x" * (MAX_CHARS + 1)}, {}, 400,
     f"{MAX_CHARS + 1} characters long, over the limit of {MAX_CHARS}"),
    ("POST", "/api/chat", {"message": "hi", "conversation_id": "deadbeef"}, {}, 404,
     "unknown conversation id 'deadbeef'"),
    ("POST", "/api/chat", b'{"message": "hi",', {}, 400, "malformed JSON body"),
    ("POST", "/api/chat", b"\xff\xfe", {}, 400, "not UTF-8"),
    ("POST", "/api/chat", [1, 2], {}, 400, "must be an object"),
    ("POST", "/api/chat", {"mesage": "hi"}, {}, 400, "missing field(s) message"),
    ("POST", "/api/chat", {"message": "hi", "extra": 1}, {}, 400, "unknown field(s) extra"),
    ("POST", "/api/chat", {"message": 5}, {}, 400, "message must be a string"),
    ("POST", "/api/chat", {"message": "hi", "lang": "fr"}, {}, 400, "lang must be one of"),
    ("POST", "/api/chat", {"message": "hi"}, {"content_type": "text/plain"}, 415,
     "Content-Type must be application/json"),
    ("POST", "/api/chat", b'{"message": "' + b"x" * 2 * MAX_BODY + b'"}', {}, 413,
     f"over the limit of {MAX_BODY}"),
    ("POST", "/api/feedback", {"conversation_id": NOBODY, "message_id": 123456,
                               "label": "like"}, {}, 404, "unknown message id 123456"),
    ("POST", "/api/feedback", {"conversation_id": NOBODY, "message_id": "1", "label": "like"},
     {}, 400, "message_id must be an integer"),
    ("POST", "/api/feedback", {"conversation_id": NOBODY, "message_id": 1, "label": "love"}, {},
     400, 'label must be "like" or "dislike"'),
    ("POST", "/api/feedback", {"conversation_id": NOBODY, "message_id": 1, "label": "like",
                               "event_id": ""}, {}, 400, "event_id"),
    ("POST", "/api/feedback", {"message_id": 1, "label": "like"}, {}, 400,
     "missing field(s) conversation_id"),
    ("POST", "/api/feedback", {"conversation_id": 7, "message_id": 1, "label": "like"}, {}, 400,
     "conversation_id must be a string"),
    ("GET", "/etc/passwd", None, {}, 404, "no such path"),
    ("GET", "/static/../serve.py", None, {}, 404, "no such path"),
    ("GET", "/api/chat", None, {}, 405, "use POST"),
    ("DELETE", "/api/feedback", None, {}, 405, "use POST"),
    ("GET", "/api/health", None, {"headers": {"Host": "evil.example:8000"}}, 403,
     "not allowed"),
]


def test_bad_requests_get_a_4xx_and_a_clear_message(server):
  port, service = server
  status, ok = call(port, "POST", "/api/chat", {"message": "first"})
  assert status == 200
  before = _rows(service)
  for method, path, body, options, want_status, words in BAD_REQUESTS:
    if isinstance(body, bytes):
      status, reply = call(port, method, path, raw=body, **options)
    else:
      status, reply = call(port, method, path, body, **options)
    assert (status, words in reply["error"]) == (want_status, True), (path, body, reply)
    # The server is still up, and a valid request still works.
    assert call(port, "GET", "/api/health")[0] == 200
  # Feedback on a question, and an event id reused for another label.
  cid = ok["conversation_id"]
  status, reply = call(port, "POST", "/api/feedback", {"conversation_id": cid,
                                                       "message_id": ok["user_message_id"],
                                                       "label": "like"})
  assert status == 400 and "only answers" in reply["error"]
  assert call(port, "POST", "/api/feedback", {"conversation_id": cid,
                                              "message_id": ok["message_id"], "label": "like",
                                              "event_id": "e"})[0] == 200
  status, reply = call(port, "POST", "/api/feedback", {"conversation_id": cid,
                                                       "message_id": ok["message_id"],
                                                       "label": "dislike", "event_id": "e"})
  assert status == 409 and "already used" in reply["error"]
  # Nothing the refused requests carried was stored.
  assert _rows(service) == dict(before, feedback_events=before["feedback_events"] + 1)
  status, again = call(port, "POST", "/api/chat", {"message": "still there?",
                                                   "conversation_id": ok["conversation_id"]})
  assert status == 200 and again["conversation_id"] == ok["conversation_id"]


def test_feedback_must_name_the_answers_conversation(server):
  """Message ids count up from 1: a client naming only an id could rate anyone's answer."""
  port, service = server
  store = service.store
  mine, theirs = store.start_conversation(), store.start_conversation()
  store.add_message(mine, "user", "q")
  answer = store.add_message(mine, "assistant", "a")
  store.add_message(theirs, "user", "q")
  before = _rows(service)
  for cid in (theirs, NOBODY):
    status, reply = call(port, "POST", "/api/feedback", {"conversation_id": cid,
                                                         "message_id": answer, "label": "like"})
    assert (status, reply["error"]) == (
        404, f"unknown message id {answer} in conversation {cid!r}")
  assert _rows(service) == before
  status, reply = call(port, "POST", "/api/feedback", {"conversation_id": mine,
                                                       "message_id": answer, "label": "like"})
  assert status == 200 and store.conversation(mine)["messages"][1]["label"] == "like"


TIMEOUT = 1.0  # the socket timeout of the servers below, in seconds
DEEP = 100_000


def _nested(depth):
  return b"[" * depth + b"]" * depth


def _feedback_body(message_id=b"1", label=b'"like"'):
  return b'{"conversation_id": "c", "message_id": ' + message_id + b', "label": ' + label + b"}"


HOSTILE_BODIES = [
    # (path, raw body, words in the error); none may get a 500
    ("/api/feedback", b"[" * DEEP, "nested too deeply"),
    ("/api/chat", b'{"message": ' + _nested(DEEP) + b"}", "nested too deeply"),
    ("/api/feedback", _feedback_body(b"1e30"), "message_id must be an integer, got 1e+30"),
    ("/api/feedback", _feedback_body(b"1.0"), "message_id must be an integer"),
    ("/api/feedback", _feedback_body(b"1" + b"0" * 30), "message_id must be between 1 and"),
    ("/api/feedback", _feedback_body(str(2**63).encode()), "message_id must be between 1 and"),
    ("/api/feedback", _feedback_body(b"0"), "message_id must be between 1 and"),
    ("/api/feedback", _feedback_body(b"-7"), "message_id must be between 1 and"),
    ("/api/feedback", _feedback_body(b"9" * 5000), "malformed JSON body"),
    ("/api/feedback", _feedback_body(_nested(400)), "message_id must be an integer"),
    # Nested below the parser's limit: echoed by type, never printed.
    ("/api/feedback", _feedback_body(label=_nested(400)), "got an array"),
    ("/api/chat", b'{"message": ' + _nested(400) + b"}", "message must be a string, got an"),
    ("/api/chat", b'{"message": "hi", "lang": ' + _nested(400) + b"}", "lang must be one of"),
    ("/api/chat", b'{"message": "hi", "conversation_id": ' + _nested(400) + b"}",
     "conversation_id must be a string, got an array"),
]


class _ExtraServer:
  """Another server on the module's service, with other limits; `with` gives its port."""

  def __init__(self, service, **options):
    self.httpd = serve.make_server(service, "127.0.0.1", 0, **options)

  def __enter__(self):
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    return self.httpd.server_address[1]

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


def test_hostile_json_gets_a_4xx_never_a_500(server):
  _, service = server
  before = _rows(service)
  with _ExtraServer(service, max_body_bytes=4 * DEEP, socket_timeout=10.0) as port:
    for path, body, words in HOSTILE_BODIES:
      status, reply = call(port, "POST", path, raw=body)
      assert (status, words in reply["error"]) == (400, True), (path, body[:80], reply)
      assert call(port, "GET", "/api/health")[0] == 200
  assert _rows(service) == before


def _read_until_closed(sock):
  """Everything the server sends before it closes the connection."""
  data = b""
  try:
    while chunk := sock.recv(65536):
      data += chunk
  except ConnectionResetError:
    pass
  sock.close()
  return data


def test_body_shorter_than_its_length_is_dropped_within_the_timeout(server):
  _, service = server
  with _ExtraServer(service, socket_timeout=TIMEOUT) as port:
    liar = socket.create_connection(("127.0.0.1", port), timeout=10 * TIMEOUT)
    start = time.monotonic()
    liar.sendall(b"POST /api/feedback HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                 b'{"message_')  # 10 of the 100 bytes, and then nothing
    # Served meanwhile, long before the liar's deadline.
    assert call(port, "GET", "/api/health")[0] == 200
    assert time.monotonic() - start < TIMEOUT / 2
    reply = _read_until_closed(liar)  # blocks until the server closes (test timeout: 10 s)
    elapsed = time.monotonic() - start
  assert reply.startswith(b"HTTP/1.0 408 ") and b"did not arrive within 1 s" in reply
  assert 0.8 * TIMEOUT < elapsed < TIMEOUT + 1.5  # slack for a busy machine


def _handler_threads():
  return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_idle_connections_past_the_cap_get_a_503_and_threads_stay_bounded(server):
  _, service = server
  cap = 4
  deadline = time.monotonic() + 5  # the module's server finishing earlier tests' connections
  while _handler_threads() and time.monotonic() < deadline:
    time.sleep(0.01)
  before = _handler_threads()
  with _ExtraServer(service, socket_timeout=TIMEOUT, max_connections=cap) as port:
    start = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10 * TIMEOUT)
            for _ in range(3 * cap)]  # sending nothing; accepted in this order
    refused = [_read_until_closed(s) for s in idle[cap:]]
    refused_in = time.monotonic() - start
    peak = _handler_threads() - before
    dropped = [_read_until_closed(s) for s in idle[:cap]]
    dropped_in = time.monotonic() - start
    assert call(port, "GET", "/api/health")[0] == 200  # the slots are free again
  assert all(r.startswith(b"HTTP/1.0 503 ") and b"too many connections" in r for r in refused)
  assert refused_in < TIMEOUT / 2 and peak == cap
  assert dropped == [b""] * cap and dropped_in < TIMEOUT + 1.5  # closed by the timeout
  deadline = time.monotonic() + 5
  while _handler_threads() > before and time.monotonic() < deadline:
    time.sleep(0.01)
  assert _handler_threads() == before


def test_200_concurrent_feedback_posts_all_land_once(server):
  port, service = server
  store = service.store
  cid = store.start_conversation()
  store.add_message(cid, "user", "q")
  answers = [store.add_message(cid, "assistant", f"a{i}") for i in range(10)]
  before = len(store.feedback_rows())
  acked, errors = {}, []

  def client(worker):
    try:
      for i in range(10):
        event = f"c{worker}-{i}"
        body = {"conversation_id": cid, "message_id": answers[(worker + i) % 10],
                "label": feedback.LABELS[i % 2], "event_id": event}
        status, reply = call(port, "POST", "/api/feedback", body)
        assert status == 200, reply
        acked[event] = reply["feedback_id"]
      # A client that never saw its last reply sends it again: still one row.
      status, reply = call(port, "POST", "/api/feedback", body)
      assert status == 200 and reply["feedback_id"] == acked[event]
    except Exception as e:  # noqa: BLE001 -- reported below
      errors.append(e)

  # The model is busy the whole time: feedback must not wait for it.
  with service.model_lock:
    threads = [threading.Thread(target=client, args=(w,)) for w in range(20)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  assert not errors, errors[:3]
  rows = store.feedback_rows()[before:]
  assert len(rows) == 200
  assert len({r["id"] for r in rows}) == len({r["event_id"] for r in rows}) == 200
  assert {r["event_id"]: r["id"] for r in rows} == acked
  assert sorted((r["message_id"], r["label"]) for r in rows) == sorted(
      (answers[(w + i) % 10], feedback.LABELS[i % 2]) for w in range(20) for i in range(10))


def _start_server(workdir, run_dir, log_path):
  """A server subprocess on a free port; (process, port) once it listens."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with open(log_path, "a") as log:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_jax.chat.server", f"--workdir={workdir}",
         f"--checkpoint={run_dir}", "--port=0", "--max_new_tokens=4"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
  line = proc.stdout.readline()  # "serving ... on http://127.0.0.1:PORT/ ..."
  if "http://127.0.0.1:" not in line:
    proc.kill()
    raise AssertionError(f"server did not start: {line!r}; log:\n" + open(log_path).read()[-3000:])
  port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
  return proc, port


def _snapshot(directory):
  return {os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
          for root, _, files in os.walk(directory) for f in files}


@pytest.mark.slow
def test_killed_server_keeps_every_acknowledged_feedback(tmp_path, run_dir):
  workdir = str(tmp_path / "w")
  with feedback.FeedbackStore(feedback.default_path(workdir)) as store:
    cid = store.start_conversation()
    store.add_message(cid, "user", "q")
    answers = [store.add_message(cid, "assistant", f"a{i}") for i in range(5)]
  checkpoint_files = _snapshot(run_dir)
  proc, port = _start_server(workdir, run_dir, tmp_path / "server.log")
  acked, stop = [], threading.Event()

  def client(worker):
    i = 0
    while not stop.is_set():
      i += 1
      try:
        status, reply = call(port, "POST", "/api/feedback", {
            "conversation_id": cid, "message_id": answers[i % 5], "label": "like",
            "event_id": f"k{worker}-{i}"}, timeout=10)
      except OSError:
        continue  # killed mid-request: never acknowledged
      if status == 200:
        acked.append(reply["feedback_id"])

  threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
  for t in threads:
    t.start()
  try:
    deadline = time.time() + 120
    while len(acked) < 150 and time.time() < deadline:
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-traffic: clients are still posting
    proc.wait(timeout=30)
  finally:
    stop.set()
    for t in threads:
      t.join()
  assert len(acked) >= 150
  proc, port = _start_server(workdir, run_dir, tmp_path / "server.log")
  try:
    assert call(port, "GET", "/api/health")[0] == 200
    status, reply = call(port, "POST", "/api/feedback", {"conversation_id": cid,
                                                         "message_id": answers[0],
                                                         "label": "dislike"})
    assert status == 200
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
  with feedback.FeedbackStore(feedback.default_path(workdir)) as store:
    stored = {r["id"] for r in store.feedback_rows()}
  assert set(acked) <= stored and reply["feedback_id"] in stored
  assert len(acked) == len(set(acked))
  # It wrote nothing outside its workdir: the checkpoint it read is untouched.
  assert _snapshot(run_dir) == checkpoint_files
  assert sorted(os.listdir(tmp_path)) == ["server.log", "w"]
  assert sorted(os.listdir(workdir)) == ["feedback"]
