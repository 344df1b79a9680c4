r"""A local web page to chat with a checkpoint and like or dislike its answers, and its JSON API.

  python -m rlhf_jax.chat.server --workdir=W [--host=127.0.0.1] [--port=8000] [--checkpoint=DIR]

Standard library only (`http.server.ThreadingHTTPServer`). The page (`GET /`) has a chat box,
an English / Chinese selector and a like and a dislike button under every answer; its script
puts every user and model text on the page with `textContent`, never as HTML, and the page's
Content-Security-Policy allows no inline script at all. The API behind it:

  POST /api/chat      {conversation_id?, message, lang?}
                      -> {conversation_id, message_id, user_message_id, answer, checkpoint_step}
  POST /api/feedback  {conversation_id, message_id, label: "like" | "dislike", event_id?}
                      -> {feedback_id, message_id, label}; the answer must be one of that
                      conversation's (404 otherwise: a client rates only what it was given)
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
  - A client has --socket_timeout seconds (10) to send its whole request, then its connection
    is closed; at most --max_connections (64) connections are served at once, and one more is
    answered 503 and closed at once, so idle or half-sent connections cannot exhaust threads.
  - Feedback is acknowledged (200) only after its transaction has committed
    (rlhf_jax.data.feedback); a client may resend a click with the same event_id and nothing is
    counted twice.
  - It writes only `W/feedback/` (the SQLite store: directory 0700, database 0600) and serves
    only the page's three resources, read into memory at start from rlhf_jax/chat/assets/
    (rlhf_jax.chat.handler), never a file by request path.

Layout: rlhf_jax.chat.api (what each call does), rlhf_jax.chat.handler (HTTP), this module
(the threaded server, its connection cap, and the command line).
"""
from __future__ import annotations

import functools
import http.server
import logging
import os
import socket
import threading

from absl import app, flags

from rlhf_jax.chat import cli, model_choice
from rlhf_jax.chat.api import DEFAULT_MAX_MESSAGE_CHARS, ApiError, ChatService  # noqa: F401
from rlhf_jax.chat.handler import (DEFAULT_MAX_BODY_BYTES, DEFAULT_SOCKET_TIMEOUT,
                                   LOOPBACK_NAMES, Handler, HandlerConfig)
from rlhf_jax.core.logs import setup_logging
from rlhf_jax.data import feedback

log = logging.getLogger("rlhf_jax.chat.server")  # the same name when run as __main__

DEFAULT_MAX_CONNECTIONS = 64
_BUSY_BODY = b'{"error": "too many connections; try again in a moment"}'
BUSY_REPLY = (b"HTTP/1.0 503 Service Unavailable\r\n"
              b"Content-Type: application/json; charset=utf-8\r\n"
              b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n"
              b"Retry-After: 1\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n"
              + _BUSY_BODY)


class Server(http.server.ThreadingHTTPServer):
  """A thread per connection, at most `max_connections` of them: past the cap a connection is
  answered 503 and closed by the accepting thread, without waiting for its request (which an
  idle client would never send)."""

  daemon_threads = True
  request_queue_size = 128  # many clients connecting at once are queued, not refused

  def __init__(self, address, config: HandlerConfig, *,
               max_connections: int = DEFAULT_MAX_CONNECTIONS):
    if max_connections < 1:
      raise ValueError(f"max_connections must be at least 1, got {max_connections}")
    self.config = config
    self.max_connections = max_connections
    self.connection_slots = threading.BoundedSemaphore(max_connections)
    super().__init__(address, Handler)

  def process_request(self, request, client_address) -> None:
    if not self.connection_slots.acquire(blocking=False):
      log.warning("refused %s: %d connections open already", client_address[0],
                  self.max_connections)
      refuse_busy(request)
      self.shutdown_request(request)
      return
    try:
      super().process_request(request, client_address)  # starts the connection's thread
    except BaseException:
      self.connection_slots.release()
      raise

  def process_request_thread(self, request, client_address) -> None:
    try:
      super().process_request_thread(request, client_address)
    finally:
      self.connection_slots.release()


def refuse_busy(request: socket.socket) -> None:
  """Writes the 503 without blocking: a new connection's send buffer is empty, and a client
  that does not read it must not stall the accepting thread."""
  try:
    request.setblocking(False)
    request.send(BUSY_REPLY)
  except OSError:
    pass


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000, *,
                max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
                max_connections: int = DEFAULT_MAX_CONNECTIONS) -> Server:
  """A bound server (port 0: any free port; see `server.server_address`); call serve_forever."""
  config = HandlerConfig(service, max_body_bytes=max_body_bytes,
                         loopback_only=host in LOOPBACK_NAMES, socket_timeout=socket_timeout)
  return Server((host, port), config, max_connections=max_connections)


# ------------------------------------------------------------------------------------- main


def serve(workdir: str, host: str = "127.0.0.1", port: int = 8000, checkpoint: str = "", *,
          generation=None, max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
          socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
          max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
  """Loads the model, opens the store and serves until interrupted."""
  workdir = os.path.abspath(workdir)
  model = model_choice.load_chat_model(workdir, checkpoint, generation)
  with feedback.FeedbackStore(feedback.default_path(workdir)) as store:
    service = ChatService(model, store, max_message_chars=max_message_chars)
    server = make_server(service, host, port, max_body_bytes=max_body_bytes,
                         socket_timeout=socket_timeout, max_connections=max_connections)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {model.description} on http://{bound_host}:{bound_port}/ "
          f"(feedback in {store.path})", flush=True)
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      pass
    finally:
      server.server_close()


def define_flags() -> dict:
  """The command's flags ({name: FlagHolder}); defined when it runs, not at import."""
  return {
      **cli.define_model_flags(),
      "host": flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default)."),
      "port": flags.DEFINE_integer("port", 8000, "Port (0: any free port, printed at start)."),
      "max_message_chars": flags.DEFINE_integer(
          "max_message_chars", DEFAULT_MAX_MESSAGE_CHARS, "Longest message accepted, in "
          "characters."),
      "max_body_bytes": flags.DEFINE_integer("max_body_bytes", DEFAULT_MAX_BODY_BYTES,
                                             "Largest request body accepted, in bytes."),
      "socket_timeout": flags.DEFINE_float(
          "socket_timeout", DEFAULT_SOCKET_TIMEOUT,
          "Seconds a client has to send its whole request (and for each write of the reply)."),
      "max_connections": flags.DEFINE_integer(
          "max_connections", DEFAULT_MAX_CONNECTIONS,
          "Connections served at once; more are answered 503."),
  }


def main(argv, options: dict) -> None:
  del argv
  setup_logging()
  value = {name: holder.value for name, holder in options.items()}
  serve(value["workdir"], value["host"], value["port"], value["checkpoint"],
        generation=cli.generation(options), max_message_chars=value["max_message_chars"],
        max_body_bytes=value["max_body_bytes"], socket_timeout=value["socket_timeout"],
        max_connections=value["max_connections"])


def run_cli() -> None:
  app.run(functools.partial(main, options=define_flags()))


if __name__ == "__main__":
  run_cli()
