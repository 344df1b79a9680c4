"""The model people chat with: which checkpoint, its shape, its tokenizer, and generation.

Shared by the terminal chat (`rlhf_jax.chat.terminal`) and the web server
(`rlhf_jax.chat.server`), so both
answer with the same model for the same flags. `load_chat_model(workdir, checkpoint)` accepts:

  a run directory   holding `checkpoints/` (orbax) -- SFT, PPO, KTO, DPO or a pretraining run;
                    or that `checkpoints/` directory itself
  a pretrained one  a Hugging Face directory, a .gguf file, or `smollm2_135m`
                    (rlhf_jax.models.pretrained), with its own tokenizer
  nothing           the newest finished stage of a pipeline workdir among kto, dpo, ppo and sft,
                    else the workdir itself when it holds `checkpoints/`

A run's shape and tokenizer come from its record (`run.json`, core/run_folder.py), written by
the trainer that made it: nothing is read from any other run, so a run folder copied anywhere
answers the same.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Iterator, Optional

from rlhf_jax.core import run_folder
from rlhf_jax.text.hf_tokenizer import HFTokenizer
from rlhf_jax.models import hf_import, pretrained
from rlhf_jax.infer import answers as respond

log = logging.getLogger(__name__)

# Stages of a pipeline workdir that hold a chat model, in order of preference on a tie.
STAGES = ("kto", "dpo", "ppo", "sft")


@dataclasses.dataclass
class Generation:
  """How answers are sampled."""
  max_new_tokens: int = 128
  temperature: float = 0.7
  top_p: float = 0.95
  greedy: bool = False
  seed: int = 0


@dataclasses.dataclass
class ChatModel:
  """Params, shape and tokenizer of one checkpoint, and where it came from."""
  params: Any
  model_config: Any
  tokenizer: Any
  checkpoint_dir: str
  step: Optional[int] = None  # None for an imported pretrained model
  generation: Generation = dataclasses.field(default_factory=Generation)

  def __post_init__(self):
    self._calls = 0
    self._calls_lock = threading.Lock()

  @property
  def description(self) -> str:
    step = f" step {self.step}" if self.step is not None else ""
    return f"{self.checkpoint_dir}{step}"

  def _next_rng(self):
    import jax
    with self._calls_lock:  # every answer draws from its own key
      self._calls += 1
      n = self._calls
    return jax.random.fold_in(jax.random.key(self.generation.seed), n)

  def stream(self, messages) -> Iterator[str]:
    """The answer to a conversation ([{role, content}], ending with a user turn), as text
    increments (rlhf_jax.infer.answers.stream_answer)."""
    g = self.generation
    # A long answer budget still leaves half the context to the conversation.
    max_new_tokens = min(g.max_new_tokens, self.model_config.max_len // 2)
    return respond.stream_answer(self.params, self.model_config, self.tokenizer, messages,
                                 rng=self._next_rng(), max_new_tokens=max_new_tokens,
                                 temperature=g.temperature, top_p=g.top_p, greedy=g.greedy)

  def reply(self, messages) -> str:
    return "".join(self.stream(messages))


# ------------------------------------------------------------------------------ where from


def _is_finished(run: str, step: int) -> bool:
  steps = (run_folder.read_saved_config(run, step).get("train") or {}).get("steps") or 0
  return not steps or step >= steps


def find_stage(workdir: str) -> str:
  """The run directory to chat with when no --checkpoint is given (module docstring)."""
  found = []  # (finished, mtime of the latest step, preference, run dir)
  for rank, stage in enumerate(STAGES):
    run = os.path.join(workdir, stage)
    if not run_folder.has_checkpoint(run):
      continue
    step = run_folder.latest_step(run)
    mtime = os.path.getmtime(os.path.join(run_folder.checkpoint_dir(run), str(step)))
    found.append((_is_finished(run, step), mtime, -rank, run))
  if found:
    finished, _, _, run = max(found)
    if not finished:
      log.warning("no stage of %s has finished; chatting with the newest checkpoint, %s",
                  workdir, run)
    return run
  if run_folder.has_checkpoint(workdir):
    return workdir
  raise FileNotFoundError(
      f"{workdir} holds no checkpoint to chat with: looked for {', '.join(STAGES)} "
      f"run folders and for {run_folder.checkpoint_dir(workdir)}; pass "
      "--checkpoint=<run dir, Hugging Face dir, .gguf file or smollm2_135m>")


def load_run(run: str, step: Optional[int] = None,
             generation: Optional[Generation] = None) -> ChatModel:
  """A ChatModel from a run folder (or its checkpoints/ directory): its record names the
  model's shape and tokenizer (core/run_folder.py)."""
  if not run_folder.has_checkpoint(run):
    raise FileNotFoundError(f"{run} holds no orbax checkpoint (no checkpoints/<step>/)")
  run = run_folder.root(run)
  if run_folder.read_record(run)["kind"] != "policy":
    raise ValueError(f"{run} holds a reward model, not a language model (a reward model cannot "
                     "chat): pass a policy run (SFT, PPO, KTO, DPO)")
  step = run_folder.latest_step(run) if step is None else step
  params, model_config = run_folder.load_policy(run, step, remat=False)
  tokenizer = run_folder.tokenizer(run)
  where = f"{run_folder.checkpoint_dir(run)} step {step}"
  log.info("chat model: %s (%s)", where, tokenizer)
  return ChatModel(params, model_config, tokenizer, run_folder.checkpoint_dir(run), step,
                   generation or Generation())


def load_pretrained(path: str, generation: Optional[Generation] = None) -> ChatModel:
  """A ChatModel from a Hugging Face directory, a .gguf file or a preset name."""
  source = pretrained.resolve(path)
  model_config, params = hf_import.load_pretrained(source)
  tokenizer = HFTokenizer.load(source, model_config.vocab_size)
  return ChatModel(params, model_config, tokenizer, os.path.abspath(source), None,
                   generation or Generation())


def load_chat_model(workdir: str, checkpoint: str = "",
                    generation: Optional[Generation] = None) -> ChatModel:
  """The model `--workdir` / `--checkpoint` name (module docstring)."""
  if checkpoint:
    if checkpoint in pretrained.SHAPES or hf_import.is_pretrained_path(checkpoint):
      return load_pretrained(checkpoint, generation)
    if not os.path.exists(checkpoint):
      raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")
    return load_run(checkpoint, generation=generation)
  return load_run(find_stage(workdir), generation=generation)
