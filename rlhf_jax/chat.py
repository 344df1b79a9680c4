r"""Chat with a checkpoint in the terminal, and like or dislike its answers.

  python -m rlhf_jax.chat --workdir=W [--checkpoint=DIR] [--lang=en|zh]

Answers are streamed token by token. Commands:
  /like, /dislike   rate the last answer (a second rating of the same answer replaces the first
                    on export)
  /reset            start a new conversation
  /quit             leave (so does end of input, Ctrl-D)
  //text            send "/text" as a message
Everything said and every rating goes to `W/feedback/feedback.sqlite` (rlhf_jax.data.feedback),
the store the web server (rlhf_jax.serve) writes too; export it for training with
`python -m rlhf_jax.data.feedback export --workdir=W`. Which model answers: see
rlhf_jax/chat_model.py (`--checkpoint` or the newest finished stage of W).
"""
from __future__ import annotations

import sys
from typing import Optional, TextIO

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
        self.store.add_feedback(self.last_answer_id, label)
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


def main(argv) -> None:
  del argv
  import os
  from rlhf_jax import chat_model
  from rlhf_jax.data import feedback
  from rlhf_jax.launch import setup_logging
  setup_logging()
  generation = chat_model.Generation(
      max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value,
      greedy=_GREEDY.value, seed=_SEED.value)
  model = chat_model.load_chat_model(_WORKDIR.value, _CHECKPOINT.value, generation)
  with feedback.FeedbackStore(feedback.default_path(os.path.abspath(_WORKDIR.value))) as store:
    try:
      TerminalChat(model, store, lang=_LANG.value).run()
    except KeyboardInterrupt:
      print()


if __name__ == "__main__":
  from absl import app, flags
  _WORKDIR = flags.DEFINE_string("workdir", None, "Workdir: its stages and feedback/ store.",
                                 required=True)
  _CHECKPOINT = flags.DEFINE_string(
      "checkpoint", "", "A run dir, HF dir, .gguf or smollm2_135m ('' = newest stage of W).")
  _LANG = flags.DEFINE_enum("lang", "en", ["en", "zh"], "Language of the conversations.")
  _MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 128, "Longest answer, in tokens.")
  _TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature.")
  _TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.")
  _GREEDY = flags.DEFINE_bool("greedy", False, "Argmax decoding.")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  app.run(main)
