"""The model people chat with: which checkpoint, its shape, its tokenizer, and generation.

Shared by the terminal chat (`rlhf_jax.chat.terminal`) and the web server (`rlhf_jax.chat.server`), so both
answer with the same model for the same flags. `load_chat_model(workdir, checkpoint)` accepts:

  a run directory   holding `checkpoints/` (orbax) -- SFT, PPO, KTO, DPO or a pretraining run;
                    or that `checkpoints/` directory itself
  a pretrained one  a Hugging Face directory, a .gguf file, or `smollm2_135m`
                    (rlhf_jax.models.pretrained), with its own tokenizer
  nothing           the newest finished stage of a pipeline workdir among kto, dpo, ppo and sft,
                    else the workdir itself when it holds `checkpoints/`

A run's shape comes from the config saved with its checkpoint. Trainers never write derived
values back, so that config's `model` section may not be the policy's shape: a PPO run takes
its policy's shape from the SFT checkpoint it started from (`sft_dir`). So the saved config and
the configs of the runs it points to (`sft_dir`, `init_from`, ...) are tried in turn, and the
first whose parameter shapes equal the checkpoint's is used; none matching is an error listing
the tensors that differ. The tokenizer is found the same way: the run's `tokenizer.path`, its
own `tokenizer/tokenizer.model`, then those of the runs it points to.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Any, Iterator, Optional

log = logging.getLogger(__name__)

# Stages of a pipeline workdir that hold a chat model, in order of preference on a tie.
STAGES = ("kto", "dpo", "ppo", "sft")
# Config fields that name another run whose config or tokenizer may describe this one.
_POINTERS = ("sft_dir", "policy_dir", "init_from", "ref_dir")


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
    from rlhf_jax.infer import answers as respond
    g = self.generation
    # A long answer budget still leaves half the context to the conversation.
    max_new_tokens = min(g.max_new_tokens, self.model_config.max_len // 2)
    return respond.stream_answer(self.params, self.model_config, self.tokenizer, messages,
                                 rng=self._next_rng(), max_new_tokens=max_new_tokens,
                                 temperature=g.temperature, top_p=g.top_p, greedy=g.greedy)

  def reply(self, messages) -> str:
    return "".join(self.stream(messages))


# ------------------------------------------------------------------------------ where from


def _has_steps(directory: str) -> bool:
  """An orbax checkpoint directory: at least one all-digit step folder."""
  return os.path.isdir(directory) and any(
      name.isdigit() and os.path.isdir(os.path.join(directory, name))
      for name in os.listdir(directory))


def checkpoints_dir(path: str) -> Optional[str]:
  """The orbax directory of a run dir or of the checkpoints/ dir itself; None if neither."""
  inner = os.path.join(path, "checkpoints")
  if _has_steps(inner):
    return inner
  if _has_steps(path):
    return path
  return None


def _checkpointer(directory: str):
  from rlhf_jax.core.checkpoint import Checkpointer
  return Checkpointer(directory, max_to_keep=None, async_save=False)


def _read_saved(directory: str, step: Optional[int] = None) -> tuple[int, dict]:
  """(step, saved config) of an orbax directory, the latest step unless given."""
  ckpt = _checkpointer(directory)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    return step, ckpt.read_config(step) or {}
  finally:
    ckpt.close()


def _is_finished(step: int, config: dict) -> bool:
  steps = (config.get("train") or {}).get("steps") or 0
  return not steps or step >= steps


def find_stage(workdir: str) -> str:
  """The run directory to chat with when no --checkpoint is given (module docstring)."""
  found = []  # (finished, mtime of the latest step, preference, run dir)
  for rank, stage in enumerate(STAGES):
    run = os.path.join(workdir, stage)
    directory = checkpoints_dir(run)
    if directory is None:
      continue
    step, config = _read_saved(directory)
    mtime = os.path.getmtime(os.path.join(directory, str(step)))
    found.append((_is_finished(step, config), mtime, -rank, run))
  if found:
    finished, _, _, run = max(found)
    if not finished:
      log.warning("no stage of %s has finished; chatting with the newest checkpoint, %s",
                  workdir, run)
    return run
  if checkpoints_dir(workdir) is not None:
    return workdir
  raise FileNotFoundError(
      f"{workdir} holds no checkpoint to chat with: looked for {', '.join(STAGES)} "
      f"subdirectories with checkpoints/ and for {os.path.join(workdir, 'checkpoints')}; pass "
      "--checkpoint=<run dir, Hugging Face dir, .gguf file or smollm2_135m>")


def _linked_runs(config: dict) -> list[str]:
  """Run directories a saved config points to (an SFT run's, the init checkpoint's run)."""
  runs = []
  for key in _POINTERS:
    value = config.get(key)
    if not isinstance(value, str) or not value:
      continue
    path = os.path.abspath(value)
    if os.path.basename(path.rstrip("/")) == "checkpoints":
      path = os.path.dirname(path)
    if checkpoints_dir(path) is not None:
      runs.append(path)
  return runs


def _lineage(run: str, config: dict, max_runs: int = 8) -> list[tuple[str, dict]]:
  """[(run dir, saved config)]: the run, then the runs it points to, breadth first."""
  out, queue, seen = [], [(run, config)], set()
  while queue and len(out) < max_runs:
    run, config = queue.pop(0)
    if run in seen:
      continue
    seen.add(run)
    out.append((run, config))
    for linked in _linked_runs(config):
      try:
        queue.append((linked, _read_saved(checkpoints_dir(linked))[1]))
      except (FileNotFoundError, ValueError, KeyError) as e:
        log.warning("cannot read the config of %s: %s", linked, e)
  return out


def _model_config(params, lineage, where: str):
  """The first ModelConfig of the lineage whose parameter shapes are the checkpoint's."""
  import flax.linen as nn
  import jax
  from rlhf_jax.core.checkpoint import check_shapes
  from rlhf_jax.models import hf_import
  from rlhf_jax.infer.rm_scores import model_config_from_saved
  if "embed" not in params:
    raise ValueError(f"{where} holds params {sorted(params)}, not a language model's (a reward "
                     "model cannot chat): pass a policy run (SFT, PPO, KTO, DPO)")
  first_error = None
  for run, config in lineage:
    if "model" not in config:
      continue
    model_config = dataclasses.replace(model_config_from_saved(config, params), remat=False)
    expected = nn.unbox(hf_import.abstract_params(model_config))
    try:
      check_shapes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params),
                   expected, f"{where} (shape from the config of {run})")
      return model_config
    except ValueError as e:
      first_error = first_error or e
  if first_error is None:
    raise ValueError(f"{where} was saved without a model config: cannot tell its shape")
  raise first_error


def _tokenizer(lineage, vocab_size: int, where: str):
  """The tokenizer of the first run of the lineage that names or holds one."""
  from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
  from rlhf_jax.models import pretrained
  tried = []
  for run, config in lineage:
    named = (config.get("tokenizer") or {}).get("path") or ""
    candidates = [named] if named else []
    candidates.append(os.path.join(run, "tokenizer", "tokenizer.model"))
    for path in candidates:
      tried.append(path)
      if path.endswith(".model"):
        if not os.path.isfile(path):
          continue
        tokenizer = load_any_tokenizer(path)
      else:  # an imported model's own tokenizer: HF directory, .gguf file or preset name
        try:
          tokenizer = load_any_tokenizer(pretrained.resolve(path), vocab_size)
        except FileNotFoundError:
          continue
      if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"the tokenizer {path} has {tokenizer.vocab_size} tokens but the model "
                         f"{where} has a vocabulary of {vocab_size}: not the tokenizer it was "
                         "trained with")
      return tokenizer
  raise FileNotFoundError(f"no tokenizer found for {where}; tried: {', '.join(tried)}")


def load_run(run: str, step: Optional[int] = None,
             generation: Optional[Generation] = None) -> ChatModel:
  """A ChatModel from a run directory (or its checkpoints/ directory)."""
  from rlhf_jax.core.checkpoint import read_params
  directory = checkpoints_dir(run)
  if directory is None:
    raise FileNotFoundError(f"{run} holds no orbax checkpoint (no checkpoints/<step>/)")
  if directory == run and os.path.basename(run.rstrip("/")) == "checkpoints":
    run = os.path.dirname(run.rstrip("/"))
  step, config = _read_saved(directory, step)
  params = read_params(directory, step)
  lineage = _lineage(run, config)
  where = f"{directory} step {step}"
  model_config = _model_config(params, lineage, where)
  tokenizer = _tokenizer(lineage, model_config.vocab_size, where)
  log.info("chat model: %s (%s)", where, tokenizer)
  return ChatModel(params, model_config, tokenizer, os.path.abspath(directory), step,
                   generation or Generation())


def load_pretrained(path: str, generation: Optional[Generation] = None) -> ChatModel:
  """A ChatModel from a Hugging Face directory, a .gguf file or a preset name."""
  from rlhf_jax.text.hf_tokenizer import HFTokenizer
  from rlhf_jax.models import hf_import, pretrained
  source = pretrained.resolve(path)
  model_config, params = hf_import.load_pretrained(source)
  tokenizer = HFTokenizer.load(source, model_config.vocab_size)
  return ChatModel(params, model_config, tokenizer, os.path.abspath(source), None,
                   generation or Generation())


def load_chat_model(workdir: str, checkpoint: str = "",
                    generation: Optional[Generation] = None) -> ChatModel:
  """The model `--workdir` / `--checkpoint` name (module docstring)."""
  from rlhf_jax.models import hf_import, pretrained
  if checkpoint:
    if checkpoint in pretrained.SHAPES or hf_import.is_pretrained_path(checkpoint):
      return load_pretrained(checkpoint, generation)
    if not os.path.exists(checkpoint):
      raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")
    return load_run(checkpoint, generation=generation)
  return load_run(find_stage(workdir), generation=generation)
