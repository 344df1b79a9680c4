"""HTTP for the chat server: routes, the page's three in-memory resources, and the request
handler (rlhf_jax.chat.server documents the API and starts the server).

The page's HTML, CSS and script live in `assets/` so they can be read and edited as what they
are; they are read once, here, at import, and served from memory under fixed paths. No request
path ever reaches the filesystem.

Every connection gets one deadline for its whole request (request line, headers and body):
a client that stops sending, or trickles bytes, loses its connection when the deadline passes
instead of holding a thread forever.
"""
from __future__ import annotations

import dataclasses
import http.server
import io
import json
import logging
import os
import re
import socket
import time
from typing import Any

from rlhf_jax.chat.api import ApiError, ChatService
from rlhf_jax.data import feedback

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_SOCKET_TIMEOUT = 10.0
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
CONVERSATION_PATH = re.compile(r"^/api/conversations/([^/]+)$")
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# No inline script or style at all: the page's script is /static/app.js, served below.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def read_asset(name: str) -> bytes:
  with open(os.path.join(ASSETS, name), "rb") as f:
    return f.read()


# path -> (method, kind, what): 'static' serves (bytes, content type); 'api' calls a method of
# ChatService (with the JSON body for POST).
ROUTES = {
    "/": ("GET", "static", (read_asset("index.html"), "text/html; charset=utf-8")),
    "/static/app.js": ("GET", "static", (read_asset("app.js"), "text/javascript; charset=utf-8")),
    "/static/app.css": ("GET", "static", (read_asset("app.css"), "text/css; charset=utf-8")),
    "/api/chat": ("POST", "api", "chat"),
    "/api/feedback": ("POST", "api", "feedback"),
    "/api/health": ("GET", "api", "health"),
}


@dataclasses.dataclass(frozen=True)
class HandlerConfig:
  """What a Handler needs; the server object carries it as `server.config`."""
  service: ChatService
  max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
  loopback_only: bool = True  # refuse Host headers that are not loopback names
  socket_timeout: float = DEFAULT_SOCKET_TIMEOUT  # seconds to send a whole request

  def __post_init__(self):
    if not self.socket_timeout > 0:
      raise ValueError(f"socket_timeout must be positive, got {self.socket_timeout}")


def host_name(header: str) -> str:
  """'127.0.0.1' of '127.0.0.1:8000', '::1' of '[::1]:8000'."""
  header = header.strip().lower()
  if header.startswith("["):
    return header[1:header.find("]")] if "]" in header else header
  return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class DeadlineReader(io.RawIOBase):
  """A socket's input with one deadline for everything read through it: each receive may wait
  only for the time left, so trickling a byte now and then does not extend the request."""

  def __init__(self, sock: socket.socket, seconds: float):
    super().__init__()
    self.sock = sock
    self.deadline = time.monotonic() + seconds

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    left = self.deadline - time.monotonic()
    if left <= 0:
      raise TimeoutError("the request was not received in time")
    self.sock.settimeout(left)
    return self.sock.recv_into(buffer)


class Handler(http.server.BaseHTTPRequestHandler):
  """One request (HTTP/1.0: one per connection), parameterised by `server.config`."""

  def setup(self) -> None:
    self.config: HandlerConfig = self.server.config
    self.timeout = self.config.socket_timeout
    super().setup()  # sets the socket timeout, which bounds each write of the reply
    self.rfile.close()
    self.rfile = io.BufferedReader(DeadlineReader(self.connection, self.timeout))

  def version_string(self) -> str:
    return "rlhf_jax"

  # ------------------------------------------------------------------------------ replies

  def _send(self, status: int, body: bytes, content_type: str, extra=()) -> None:
    self.connection.settimeout(self.timeout)  # the read deadline may have shortened it
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

  def send_error(self, code, message=None, explain=None):
    """Errors http.server raises itself (bad request line, unknown method) as JSON too."""
    self.close_connection = True
    try:
      self._json(code, {"error": message or self.responses.get(code, ("error",))[0]})
    except OSError:
      pass

  def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
    log.info("%s %s", self.address_string(), format % args)

  # ----------------------------------------------------------------------------- requests

  def _read_body(self) -> bytes:
    content_type = self.headers.get("Content-Type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
      raise ApiError(415, f"Content-Type must be application/json, got "
                          f"{content_type[:80] or 'none'}")
    length = self.headers.get("Content-Length")
    if length is None:
      raise ApiError(411, "a Content-Length header is required")
    if not re.fullmatch(r"[0-9]{1,18}", length.strip()):
      raise ApiError(400, f"Content-Length must be a number of bytes, got {length[:40]!r}")
    length, limit = int(length), self.config.max_body_bytes
    if length > limit:
      self._discard(length)
      raise ApiError(413, f"the body is {length} bytes, over the limit of {limit}")
    try:
      raw = self.rfile.read(length)
    except TimeoutError:
      self.close_connection = True
      raise ApiError(408, f"the request's {length} bytes of body (its Content-Length) did not "
                          f"arrive within {self.timeout:g} s") from None
    if len(raw) < length:  # the client closed its side early
      self.close_connection = True
      raise ApiError(400, f"the body ended after {len(raw)} of its {length} bytes "
                          "(Content-Length)")
    return raw

  def _read_json(self) -> Any:
    raw = self._read_body()
    try:
      return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
      raise ApiError(400, f"the body is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
      raise ApiError(400, f"malformed JSON body: {e.msg} at line {e.lineno} column "
                          f"{e.colno}") from None
    except RecursionError:
      raise ApiError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as e:  # an integer of more digits than Python converts
      raise ApiError(400, f"malformed JSON body: {e}") from None

  def _discard(self, length: int) -> None:
    """Reads a refused body (up to a bound) so the client sees the reply, not a reset."""
    self.close_connection = True
    left = min(length, 16 * self.config.max_body_bytes)
    try:
      while left > 0:
        chunk = self.rfile.read(min(left, 65536))
        if not chunk:
          break
        left -= len(chunk)
    except TimeoutError:
      pass

  def _route(self, method: str) -> None:
    """Answers the request, or raises what the client is told instead."""
    host = self.headers.get("Host")
    if self.config.loopback_only and host is not None and host_name(host) not in LOOPBACK_NAMES:
      raise ApiError(403, f"Host {host!r} is not allowed: this server answers loopback names "
                          "only (start it with --host to change)")
    path = self.path.split("?", 1)[0]
    route = ROUTES.get(path)
    match = CONVERSATION_PATH.match(path)
    if route is None and match is None:
      raise ApiError(404, f"no such path: {path[:200]}")
    allowed = route[0] if route else "GET"
    if method != allowed and not (method == "HEAD" and allowed == "GET"):
      raise ApiError(405, f"{method} is not allowed on {path}; use {allowed}",
                     [("Allow", allowed)])
    service = self.config.service
    if match is not None:
      return self._json(200, service.conversation(match.group(1)))
    _, kind, value = route
    if kind == "static":
      content, content_type = value
      return self._send(200, content, content_type, [("Content-Security-Policy", CSP)])
    if method == "POST":
      return self._json(200, getattr(service, value)(self._read_json()))
    return self._json(200, getattr(service, value)())

  def _dispatch(self, method: str) -> None:
    try:
      self._route(method)
    except ApiError as e:
      self._json(e.status, {"error": e.message}, e.headers)
    except feedback.NotFoundError as e:
      self._json(404, {"error": str(e)})
    except feedback.ConflictError as e:
      self._json(409, {"error": str(e)})
    except ValueError as e:
      self._json(400, {"error": str(e)})
    except (ConnectionError, TimeoutError):
      self.close_connection = True  # the client went away, or stopped reading the reply
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
