r"""A local web page to chat with a checkpoint and like or dislike its answers, and its JSON API.

  python -m rlhf_jax.serve --workdir=W [--host=127.0.0.1] [--port=8000] [--checkpoint=DIR]

Standard library only (`http.server.ThreadingHTTPServer`). The page (`GET /`) has a chat box,
an English / Chinese selector and a like and a dislike button under every answer; its script
puts every user and model text on the page with `textContent`, never as HTML, and the page's
Content-Security-Policy allows no inline script at all. The API behind it:

  POST /api/chat      {conversation_id?, message, lang?}
                      -> {conversation_id, message_id, user_message_id, answer, checkpoint_step}
  POST /api/feedback  {message_id, label: "like" | "dislike", event_id?} -> {feedback_id, ...}
  GET  /api/conversations/<id>   the conversation's messages with their latest labels
  GET  /api/health    {status, model, checkpoint_step, max_message_chars}

Bad requests get a 4xx and `{"error": "..."}` saying what was wrong (empty or too long
message, unknown conversation or message id, bad label, malformed JSON, a content type other
than application/json, a body over the size limit, an unknown path), and the server carries on.

What it guarantees:
  - It binds 127.0.0.1 unless --host says otherwise; while it does, a request whose Host header
    is not a loopback name is refused (a web page cannot reach it by rebinding a DNS name), and
    requiring `application/json` keeps other origins' pages from posting to it without a CORS
    preflight, which it never grants.
  - One model, one generation at a time (a lock); feedback posts never wait for it.
  - Feedback is acknowledged (200) only after its transaction has committed
    (rlhf_jax.data.feedback); a client may resend a click with the same event_id and nothing is
    counted twice.
  - It writes only `W/feedback/` (the SQLite store) and serves only the three in-memory
    resources below, never a file by path.
"""
from __future__ import annotations

import http.server
import json
import logging
import re
import threading
from typing import Any

from rlhf_jax.data import feedback

log = logging.getLogger("rlhf_jax.serve")  # the same name when run as __main__

DEFAULT_MAX_MESSAGE_CHARS = 2000
DEFAULT_MAX_BODY_BYTES = 64 * 1024
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_CONVERSATION_PATH = re.compile(r"^/api/conversations/([^/]+)$")


class ApiError(Exception):
  """An HTTP error status with the message the client gets as {"error": message}."""

  def __init__(self, status: int, message: str, headers=()):
    super().__init__(message)
    self.status = status
    self.message = message
    self.headers = tuple(headers)


def _check_fields(body: Any, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
  if not isinstance(body, dict):
    raise ApiError(400, f"the JSON body must be an object, got {type(body).__name__}")
  missing = [k for k in required if k not in body]
  if missing:
    raise ApiError(400, f"missing field(s) {', '.join(missing)}")
  unknown = sorted(set(body) - set(required) - set(optional))
  if unknown:
    raise ApiError(400, f"unknown field(s) {', '.join(unknown)}; known: "
                        f"{', '.join(required + optional)}")
  return body


class ChatService:
  """What the API does, apart from HTTP: the store, the model and the model's lock."""

  def __init__(self, model, store: feedback.FeedbackStore, *,
               max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS):
    self.model = model
    self.store = store
    self.max_message_chars = max_message_chars
    self.model_lock = threading.Lock()

  def chat(self, body) -> dict:
    _check_fields(body, ("message",), ("conversation_id", "lang"))
    message = body["message"]
    if not isinstance(message, str):
      raise ApiError(400, f"message must be a string, got {type(message).__name__}")
    message = message.strip()
    if not message:
      raise ApiError(400, "message is empty")
    if len(message) > self.max_message_chars:
      raise ApiError(400, f"message is {len(message)} characters long, over the limit of "
                          f"{self.max_message_chars}")
    lang = body.get("lang") or "en"
    if lang not in feedback.LANGS:
      raise ApiError(400, f"lang must be one of {', '.join(feedback.LANGS)}, got {lang!r}")
    conversation_id = body.get("conversation_id")
    if conversation_id is None:
      conversation_id = self.store.start_conversation(lang)
    elif not isinstance(conversation_id, str) or not self.store.has_conversation(
        conversation_id):
      raise ApiError(404, f"unknown conversation id {str(conversation_id)[:80]!r}; leave "
                          "conversation_id out to start a new conversation")
    # The whole turn under the model lock, so two requests on one conversation cannot
    # interleave their messages.
    with self.model_lock:
      user_id = self.store.add_message(conversation_id, "user", message)
      answer = self.model.reply(self.store.history(conversation_id))
      answer_id = self.store.add_message(conversation_id, "assistant", answer,
                                         checkpoint_step=self.model.step,
                                         checkpoint_dir=self.model.checkpoint_dir)
    return {"conversation_id": conversation_id, "message_id": answer_id,
            "user_message_id": user_id, "answer": answer, "checkpoint_step": self.model.step}

  def feedback(self, body) -> dict:
    _check_fields(body, ("message_id", "label"), ("event_id",))
    message_id, label, event_id = body["message_id"], body["label"], body.get("event_id")
    if isinstance(message_id, bool) or not isinstance(message_id, int):
      raise ApiError(400, f"message_id must be an integer, got {json.dumps(message_id)[:80]}")
    if label not in feedback.LABELS:
      raise ApiError(400, f"label must be \"like\" or \"dislike\", got "
                          f"{json.dumps(label)[:80]}")
    feedback_id = self.store.add_feedback(message_id, label, event_id)  # committed on return
    return {"feedback_id": feedback_id, "message_id": message_id, "label": label}

  def conversation(self, conversation_id: str) -> dict:
    conv = self.store.conversation(conversation_id)
    return {"conversation_id": conv["id"], "lang": conv["lang"], "created": conv["created"],
            "messages": [{"message_id": m["id"], "role": m["role"], "content": m["content"],
                          "created": m["created"], "checkpoint_step": m["checkpoint_step"],
                          "label": m["label"]} for m in conv["messages"]]}

  def health(self) -> dict:
    return {"status": "ok", "model": self.model.description,
            "checkpoint_step": self.model.step, "max_message_chars": self.max_message_chars}


# ------------------------------------------------------------------------------------- HTTP


def _host_name(header: str) -> str:
  """'127.0.0.1' of '127.0.0.1:8000', '::1' of '[::1]:8000'."""
  header = header.strip().lower()
  if header.startswith("["):
    return header[1:header.find("]")] if "]" in header else header
  return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def make_handler(service: ChatService, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 loopback_only: bool = True):
  """A request handler class bound to `service` (http.server makes one instance per request)."""

  class Handler(http.server.BaseHTTPRequestHandler):
    def version_string(self):
      return "rlhf_jax"

    # ---------------------------------------------------------------------------- replies

    def _send(self, status: int, body: bytes, content_type: str, extra=()) -> None:
      self.send_response(status)
      self.send_header("Content-Type", content_type)
      self.send_header("Content-Length", str(len(body)))
      self.send_header("Cache-Control", "no-store")
      self.send_header("X-Content-Type-Options", "nosniff")
      self.send_header("Referrer-Policy", "no-referrer")
      for name, value in extra:
        self.send_header(name, value)
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(body)

    def _json(self, status: int, payload: dict, extra=()) -> None:
      self._send(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"),
                 "application/json; charset=utf-8", extra)

    def send_error(self, code, message=None, explain=None):  # noqa: N802 (http.server's name)
      """Errors http.server raises itself (bad request line, unknown method) as JSON too."""
      self.close_connection = True
      try:
        self._json(code, {"error": message or self.responses.get(code, ("error",))[0]})
      except OSError:
        pass

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
      log.info("%s %s", self.address_string(), format % args)

    # -------------------------------------------------------------------------- requests

    def _allowed_host(self) -> bool:
      host = self.headers.get("Host")
      return not loopback_only or host is None or _host_name(host) in _LOOPBACK_NAMES

    def _read_json(self) -> Any:
      content_type = self.headers.get("Content-Type", "")
      if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got "
                            f"{content_type[:80] or 'none'}")
      length = self.headers.get("Content-Length")
      if length is None or not length.strip().isdigit():
        raise ApiError(411, "a Content-Length header is required")
      length = int(length)
      if length > max_body_bytes:
        self._discard(length)
        raise ApiError(413, f"the body is {length} bytes, over the limit of {max_body_bytes}")
      raw = self.rfile.read(length)
      try:
        return json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8: {e}") from None
      except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON body: {e.msg} at line {e.lineno} column "
                            f"{e.colno}") from None

    def _discard(self, length: int) -> None:
      """Reads a refused body (up to a bound) so the client sees the reply, not a reset."""
      self.close_connection = True
      left = min(length, 16 * max_body_bytes)
      while left > 0:
        chunk = self.rfile.read(min(left, 65536))
        if not chunk:
          break
        left -= len(chunk)

    def _dispatch(self, method: str) -> None:
      try:
        if not self._allowed_host():
          raise ApiError(403, f"Host {self.headers.get('Host')!r} is not allowed: this server "
                              "answers loopback names only (start it with --host to change)")
        path = self.path.split("?", 1)[0]
        route = _ROUTES.get(path)
        match = _CONVERSATION_PATH.match(path)
        if route is None and match is None:
          raise ApiError(404, f"no such path: {path[:200]}")
        allowed = route[0] if route else "GET"
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
          raise ApiError(405, f"{method} is not allowed on {path}; use {allowed}",
                         [("Allow", allowed)])
        if match is not None:
          return self._json(200, service.conversation(match.group(1)))
        _, kind, value = route
        if kind == "static":
          content, content_type = value
          return self._send(200, content, content_type, [("Content-Security-Policy", _CSP)])
        if method == "POST":
          payload = getattr(service, value)(self._read_json())
        else:
          payload = getattr(service, value)()
        self._json(200, payload)
      except ApiError as e:
        self._json(e.status, {"error": e.message}, e.headers)
      except feedback.NotFoundError as e:
        self._json(404, {"error": str(e)})
      except feedback.ConflictError as e:
        self._json(409, {"error": str(e)})
      except ValueError as e:
        self._json(400, {"error": str(e)})
      except (BrokenPipeError, ConnectionResetError):
        pass  # the client went away
      except Exception as e:  # noqa: BLE001 -- the server must stay up; the log has the trace
        log.exception("request %s %s failed", method, self.path)
        self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def do_GET(self):  # noqa: N802
      self._dispatch("GET")

    def do_HEAD(self):  # noqa: N802
      self._dispatch("HEAD")

    def do_POST(self):  # noqa: N802
      self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
      self._dispatch("PUT")

    def do_DELETE(self):  # noqa: N802
      self._dispatch("DELETE")

    def do_PATCH(self):  # noqa: N802
      self._dispatch("PATCH")

  return Handler


class Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  request_queue_size = 128  # many clients connecting at once are queued, not refused


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000, *,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Server:
  """A bound server (port 0: any free port; see `server.server_address`); call serve_forever."""
  handler = make_handler(service, max_body_bytes=max_body_bytes,
                         loopback_only=host in _LOOPBACK_NAMES)
  return Server((host, port), handler)


# ------------------------------------------------------------------------------------ the page

_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>rlhf_jax chat</title>
<link rel="stylesheet" href="/static/app.css">
<script src="/static/app.js" defer></script>
</head>
<body>
<header>
  <h1 id="title">Chat</h1>
  <label><span id="lang-label">Language</span>
    <select id="lang">
      <option value="en">English</option>
      <option value="zh">中文</option>
    </select>
  </label>
  <button id="new" type="button">New conversation</button>
</header>
<main id="log" aria-live="polite"></main>
<p id="status" role="status"></p>
<form id="form">
  <textarea id="message" rows="2" placeholder="Say something"></textarea>
  <button id="send" type="submit">Send</button>
</form>
</body>
</html>
"""

_SCRIPT = r""""use strict";
// Every user and model text goes on the page with textContent, never as HTML.
const STRINGS = {
  en: {title: "Chat", language: "Language", newConversation: "New conversation",
       placeholder: "Say something", send: "Send", like: "Like", dislike: "Dislike",
       thinking: "…", thanks: "Thanks for the feedback."},
  zh: {title: "聊天", language: "语言", newConversation: "新对话", placeholder: "说点什么",
       send: "发送", like: "赞", dislike: "踩", thinking: "…", thanks: "谢谢你的反馈。"},
};
let lang = "en";
let conversationId = null;
const $ = (id) => document.getElementById(id);
const t = (key) => STRINGS[lang][key];

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function applyLanguage() {
  document.documentElement.lang = lang;
  $("title").textContent = t("title");
  $("lang-label").textContent = t("language");
  $("new").textContent = t("newConversation");
  $("message").placeholder = t("placeholder");
  $("send").textContent = t("send");
  for (const b of document.querySelectorAll("button.rate")) b.textContent = t(b.dataset.label);
}

function bubble(classes, text) {
  const div = document.createElement("div");
  div.className = "msg " + classes;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("log").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

async function postJson(path, payload) {
  const response = await fetch(path, {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify(payload)});
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new Error((data && data.error) || ("HTTP " + response.status));
  return data;
}

function newEventId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(16) + "-" + Math.random().toString(16).slice(2);
}

async function rate(div, messageId, label) {
  const eventId = newEventId();  // the same id on every retry: the server counts it once
  for (let attempt = 0; ; attempt++) {
    try {
      await postJson("/api/feedback", {message_id: messageId, label: label, event_id: eventId});
      break;
    } catch (e) {
      if (!(e instanceof TypeError) || attempt >= 2) { setStatus(e.message, true); return; }
    }
  }
  for (const b of div.querySelectorAll("button.rate")) {
    b.setAttribute("aria-pressed", String(b.dataset.label === label));
  }
  setStatus(t("thanks"), false);
}

function addAnswer(data) {
  const div = bubble("assistant answer", data.answer);
  div.dataset.messageId = String(data.message_id);
  const bar = document.createElement("div");
  bar.className = "rating";
  for (const label of ["like", "dislike"]) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "rate " + label;
    b.dataset.label = label;
    b.setAttribute("aria-pressed", "false");
    b.textContent = t(label);
    b.addEventListener("click", () => rate(div, data.message_id, label));
    bar.appendChild(b);
  }
  div.appendChild(bar);
}

async function send(event) {
  event.preventDefault();
  const text = $("message").value;
  if (!text.trim()) return;
  $("send").disabled = true;
  bubble("user", text);
  const pending = bubble("assistant pending", t("thinking"));
  try {
    const data = await postJson("/api/chat",
        {conversation_id: conversationId, message: text, lang: lang});
    conversationId = data.conversation_id;
    pending.remove();
    addAnswer(data);
    $("message").value = "";
    setStatus("", false);
  } catch (e) {
    pending.remove();
    setStatus(e.message, true);
  } finally {
    $("send").disabled = false;
    $("message").focus();
  }
}

function newConversation() {
  conversationId = null;
  $("log").replaceChildren();
  setStatus("", false);
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", send);
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
  });
  $("new").addEventListener("click", newConversation);
  $("lang").addEventListener("change", () => {  // a conversation keeps one language
    lang = $("lang").value;
    newConversation();
    applyLanguage();
  });
  applyLanguage();
  $("message").focus();
});
"""

_STYLE = """body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 0 auto;
  padding: 0 1rem; display: flex; flex-direction: column; height: 100vh; box-sizing: border-box; }
header { display: flex; gap: 1rem; align-items: center; }
header h1 { font-size: 1.2rem; margin-right: auto; }
#log { flex: 1; overflow-y: auto; display: flex; flex-direction: column; gap: .5rem; }
.msg { padding: .5rem .75rem; border-radius: .5rem; max-width: 80%; }
.msg .text { white-space: pre-wrap; overflow-wrap: anywhere; }
.user { align-self: flex-end; background: #dbeafe; }
.assistant { align-self: flex-start; background: #f1f5f9; }
.pending { color: #64748b; }
.rating { margin-top: .25rem; display: flex; gap: .5rem; }
.rate[aria-pressed="true"] { font-weight: bold; outline: 2px solid #2563eb; }
#status { min-height: 1.2rem; margin: .25rem 0; }
#status.error { color: #b91c1c; }
form { display: flex; gap: .5rem; padding-bottom: 1rem; }
textarea { flex: 1; font: inherit; }
"""

# path -> (method, kind, what): 'static' serves (bytes, content type); 'api' calls a method of
# ChatService (with the JSON body for POST).
_ROUTES = {
    "/": ("GET", "static", (_PAGE.encode("utf-8"), "text/html; charset=utf-8")),
    "/static/app.js": ("GET", "static", (_SCRIPT.encode("utf-8"),
                                         "text/javascript; charset=utf-8")),
    "/static/app.css": ("GET", "static", (_STYLE.encode("utf-8"), "text/css; charset=utf-8")),
    "/api/chat": ("POST", "api", "chat"),
    "/api/feedback": ("POST", "api", "feedback"),
    "/api/health": ("GET", "api", "health"),
}


# ------------------------------------------------------------------------------------- main


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8000, checkpoint: str = "", *,
          generation=None, max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
  """Loads the model, opens the store and serves until interrupted."""
  import os
  from rlhf_jax import chat_model
  workdir = os.path.abspath(workdir)
  model = chat_model.load_chat_model(workdir, checkpoint, generation)
  with feedback.FeedbackStore(feedback.default_path(workdir)) as store:
    service = ChatService(model, store, max_message_chars=max_message_chars)
    server = make_server(service, host, port, max_body_bytes=max_body_bytes)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {model.description} on http://{bound_host}:{bound_port}/ "
          f"(feedback in {store.path})", flush=True)
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      pass
    finally:
      server.server_close()


def main(argv) -> None:
  del argv
  from rlhf_jax import chat_model
  from rlhf_jax.launch import setup_logging
  setup_logging()
  generation = chat_model.Generation(
      max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
      greedy=_GREEDY.value, seed=_SEED.value)
  serve(_WORKDIR.value, _HOST.value, _PORT.value, _CHECKPOINT.value, generation=generation,
        max_message_chars=_MAX_MESSAGE_CHARS.value, max_body_bytes=_MAX_BODY_BYTES.value)


if __name__ == "__main__":
  from absl import app, flags
  _WORKDIR = flags.DEFINE_string("workdir", None, "Workdir: its stages and feedback/ store.",
                                 required=True)
  _HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default).")
  _PORT = flags.DEFINE_integer("port", 8000, "Port (0: any free port, printed at start).")
  _CHECKPOINT = flags.DEFINE_string(
      "checkpoint", "", "A run dir, HF dir, .gguf or smollm2_135m ('' = newest stage of W).")
  _MAX_MESSAGE_CHARS = flags.DEFINE_integer("max_message_chars", DEFAULT_MAX_MESSAGE_CHARS,
                                            "Longest message accepted, in characters.")
  _MAX_BODY_BYTES = flags.DEFINE_integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES,
                                         "Largest request body accepted, in bytes.")
  _MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Longest answer, in tokens.")
  _TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature.")
  _TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
  _GREEDY = flags.DEFINE_bool("greedy", False, "Argmax decoding.")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  app.run(main)
