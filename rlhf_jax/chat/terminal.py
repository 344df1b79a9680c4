r"""Chat with a checkpoint in the terminal, and like or dislike its answers.

  python -m rlhf_jax.chat.terminal --workdir=W [--checkpoint=DIR] [--lang=en|zh]
  python -m rlhf_jax.chat --workdir=W ...            (the same)

Answers are streamed token by token. Commands:
  /like, /dislike   rate the last answer (a second rating of the same answer replaces the first
                    on export)
  /reset            start a new conversation
  /quit             leave (so does end of input, Ctrl-D)
  //text            send "/text" as a message
Everything said and every rating goes to `W/feedback/feedback.sqlite` (rlhf_jax.data.feedback),
the store the web server (rlhf_jax.chat.server) writes too; export it for training with
`python -m rlhf_jax.data.feedback export --workdir=W`. Which model answers: see
rlhf_jax/chat/model_choice.py (`--checkpoint` or the newest finished stage of W).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Optional, TextIO

from absl import app, flags

from rlhf_jax.chat import cli, model_choice
from rlhf_jax.core.logs import setup_logging
from rlhf_jax.data import feedback

HELP = ("commands: /like, /dislike (rate the last answer), /reset (new conversation), "
        "/quit; //text sends \"/text\"")


class TerminalChat:
  """The loop of the module docstring, on any text streams (a test drives it with StringIO)."""

  def __init__(self, model, store, *, lang: str = "en", stdin: TextIO = sys.stdin,
               stdout: TextIO = sys.stdout):
    self.model = model
    self.store = store
    self.lang = lang
    self.stdin = stdin
    self.stdout = stdout
    self.conversation_id: Optional[str] = None  # created with the first message
    self.last_answer_id: Optional[int] = None

  def _say(self, text: str = "", end: str = "\n") -> None:
    self.stdout.write(text + end)
    self.stdout.flush()

  def run(self) -> None:
    self._say(f"Chatting with {self.model.description} ({self.lang}). {HELP}")
    while True:
      self._say("you> ", end="")
      line = self.stdin.readline()
      if not line:  # end of input
        self._say()
        return
      text = line.rstrip("\r\n").strip()
      if not text:
        continue
      if text.startswith("/") and not text.startswith("//"):
        if not self.command(text):
          return
        continue
      self.send(text[1:] if text.startswith("//") else text)

  def command(self, text: str) -> bool:
    """Runs a /command; False when the loop should end."""
    name = text.split()[0].lower()
    if name in ("/quit", "/exit"):
      return False
    if name in ("/like", "/dislike"):
      if self.last_answer_id is None:
        self._say("(no answer to rate yet)")
      else:
        label = name[1:]
        self.store.add_feedback(self.last_answer_id, label,
                                conversation_id=self.conversation_id)
        self._say(f"({label}d answer {self.last_answer_id})")
    elif name == "/reset":
      self.conversation_id, self.last_answer_id = None, None
      self._say("(new conversation)")
    elif name == "/help":
      self._say(HELP)
    else:
      self._say(f"(unknown command {name}; {HELP})")
    return True

  def send(self, text: str) -> int:
    """Stores the message, streams the answer to stdout, stores it; returns the answer's id."""
    if self.conversation_id is None:
      self.conversation_id = self.store.start_conversation(self.lang)
    self.store.add_message(self.conversation_id, "user", text)
    history = self.store.history(self.conversation_id)
    self._say("model> ", end="")
    pieces = []
    for piece in self.model.stream(history):
      pieces.append(piece)
      self._say(piece, end="")
    self._say()
    self.last_answer_id = self.store.add_message(
        self.conversation_id, "assistant", "".join(pieces), checkpoint_step=self.model.step,
        checkpoint_dir=self.model.checkpoint_dir)
    return self.last_answer_id


def main(argv, options: dict) -> None:
  del argv
  setup_logging()
  workdir = os.path.abspath(options["workdir"].value)
  model = model_choice.load_chat_model(workdir, options["checkpoint"].value,
                                       cli.generation(options))
  with feedback.FeedbackStore(feedback.default_path(workdir)) as store:
    try:
      TerminalChat(model, store, lang=options["lang"].value).run()
    except KeyboardInterrupt:
      print()


def run_cli() -> None:
  """`python -m rlhf_jax.chat.terminal` and `python -m rlhf_jax.chat`."""
  options = {**cli.define_model_flags(),
             "lang": flags.DEFINE_enum("lang", "en", ["en", "zh"],
                                       "Language of the conversations.")}
  app.run(functools.partial(main, options=options))


if __name__ == "__main__":
  run_cli()
