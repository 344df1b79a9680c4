"""What the chat server's JSON API does, apart from HTTP: checks a request's fields, talks to the
feedback store and to the model under the model's lock (rlhf_jax.chat.server documents the API).

Kept free of sockets so that every rule about what a request may say lives in one place, and
a refusal is an `ApiError` carrying the status and the message the client gets.
"""
from __future__ import annotations

import json
import threading
from typing import Any

from rlhf_jax.data import feedback

DEFAULT_MAX_MESSAGE_CHARS = 2000


class ApiError(Exception):
  """An HTTP error status with the message the client gets as {"error": message}."""

  def __init__(self, status: int, message: str, headers=()):
    super().__init__(message)
    self.status = status
    self.message = message
    self.headers = tuple(headers)


def check_fields(body: Any, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
  """`body` itself when it is an object with every required field and no unknown one."""
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


def describe(value: Any) -> str:
  """A short echo of a client's value for an error message; containers by type alone, as one
  nested a thousand levels deep would not even print."""
  if isinstance(value, str):
    return repr(value[:80])
  if value is None or isinstance(value, (int, float)):
    return json.dumps(value)[:80]
  return {"list": "an array", "dict": "an object"}.get(type(value).__name__, "a value")


class ChatService:
  """The store, the model and the model's lock; one method per API call."""

  def __init__(self, model, store: feedback.FeedbackStore, *,
               max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS):
    self.model = model
    self.store = store
    self.max_message_chars = max_message_chars
    self.model_lock = threading.Lock()

  def _message(self, body: dict) -> str:
    message = body["message"]
    if not isinstance(message, str):
      raise ApiError(400, f"message must be a string, got {describe(message)}")
    message = message.strip()
    if not message:
      raise ApiError(400, "message is empty")
    if len(message) > self.max_message_chars:
      raise ApiError(400, f"message is {len(message)} characters long, over the limit of "
                          f"{self.max_message_chars}")
    return message

  def _conversation_id(self, body: dict) -> str:
    """The request's conversation, a new one in its language when it names none."""
    lang = body.get("lang") or "en"
    if lang not in feedback.LANGS:
      raise ApiError(400, f"lang must be one of {', '.join(feedback.LANGS)}, got "
                          f"{describe(lang)}")
    conversation_id = body.get("conversation_id")
    if conversation_id is None:
      return self.store.start_conversation(lang)
    if not isinstance(conversation_id, str):
      raise ApiError(400, f"conversation_id must be a string, got {describe(conversation_id)}")
    if not self.store.has_conversation(conversation_id):
      raise ApiError(404, f"unknown conversation id {describe(conversation_id)}; leave "
                          "conversation_id out to start a new conversation")
    return conversation_id

  def chat(self, body) -> dict:
    check_fields(body, ("message",), ("conversation_id", "lang"))
    message = self._message(body)
    conversation_id = self._conversation_id(body)
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
    """A like or dislike, of an answer of the conversation the client names: message ids are
    small consecutive integers, so without the conversation (a random id the client was given)
    anyone could rate anyone's answers."""
    check_fields(body, ("conversation_id", "message_id", "label"), ("event_id",))
    conversation_id, message_id = body["conversation_id"], body["message_id"]
    label, event_id = body["label"], body.get("event_id")
    if not isinstance(conversation_id, str):
      raise ApiError(400, f"conversation_id must be a string, got {describe(conversation_id)}")
    try:
      feedback.check_row_id(message_id)
    except ValueError as e:
      raise ApiError(400, str(e)) from None
    if label not in feedback.LABELS:
      raise ApiError(400, f"label must be \"like\" or \"dislike\", got {describe(label)}")
    feedback_id = self.store.add_feedback(  # committed on return
        message_id, label, event_id, conversation_id=conversation_id)
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
