"""Prompts in, answers out: the chat template, left padding and the KV-cache sampler together.

Used wherever text is generated from a checkpoint: the demo's sample answers, evaluation, the
chat front end. Prompts are rendered with the tokenizer's chat template, left-padded to a
common length (rounded up to a bucket, so a handful of shapes are compiled, not one per batch),
and answered by `sampling.generate`; the answer is the text before the first stop token.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from rlhf_jax.infer import sampling
from rlhf_jax.models import ModelConfig, init_cache


def pad_left(rows: Sequence[np.ndarray], width: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens, mask [B, width], each row right-aligned (prompts end in the last column, where
  decoding starts). Rows must fit."""
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    tokens[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
  return tokens, mask


def left_pad(rows: Sequence[np.ndarray], pad_id: int, bucket: int = 16):
  """[B, P] tokens and mask, each row right-aligned; P the longest row rounded up to a
  multiple of `bucket` (a few compiled widths, not one per call)."""
  longest = max(len(r) for r in rows)
  return pad_left(rows, -(-longest // bucket) * bucket, pad_id)


@functools.lru_cache(maxsize=16)
def _generate_fn(model_config, max_new_tokens, stop_ids, pad_id, params_tuple):
  return sampling.make_generate_fn(model_config, max_new_tokens, stop_ids, pad_id,
                                   sampling.SamplingParams(*params_tuple))


def answer(params, model_config: ModelConfig, tokenizer, conversations, *, rng,
           max_new_tokens: int = 48, temperature: float = 0.7, top_p: float = 0.95,
           greedy: bool = False) -> list[str]:
  """One answer per conversation. `conversations`: a list of prompt strings or message lists."""
  messages = [[{"role": "user", "content": c}] if isinstance(c, str) else list(c)
              for c in conversations]
  rows = [tokenizer.render_prompt(m) for m in messages]
  max_prompt = model_config.max_len - max_new_tokens
  rows = [r[-max_prompt:] for r in rows]  # keep the most recent turns if a chat grows long
  tokens, mask = left_pad(rows, tokenizer.pad_id)
  fn = _generate_fn(model_config, max_new_tokens, tuple(tokenizer.stop_ids()), tokenizer.pad_id,
                    (temperature, 0, top_p, greedy))
  out = jax.device_get(fn({"params": params}, tokens, mask, rng))
  answers = []
  for row, row_mask in zip(out["tokens"], out["mask"]):
    ids = [int(t) for t, m in zip(row, row_mask) if m and int(t) not in tokenizer.stop_ids()]
    answers.append(tokenizer.decode(ids))
  return answers


# ------------------------------------------------------------------------------------ streaming


class IncrementalDecoder:
  """Text increments of a growing list of ids, never splitting a character.

  Byte-fallback pieces spread one Chinese character (or emoji) over several ids; decoding a
  prefix that ends inside such a character gives U+FFFD for the missing bytes. So text is only
  handed out up to the last complete character, and a prefix is only handed out once the text
  decoded so far starts with everything handed out before. `finish()` returns whatever is left,
  so the increments always add up to `tokenizer.decode(ids)`.
  """

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self._ids: list[int] = []
    self._emitted = ""

  def push(self, token_id: int) -> str:
    """The new complete text after appending `token_id` ('' while a character is unfinished)."""
    self._ids.append(int(token_id))
    text = self._tokenizer.decode(self._ids)
    stable = text.rstrip("\ufffd")
    if not stable.startswith(self._emitted):
      return ""  # an earlier piece decodes differently in context: wait for it to settle
    new = stable[len(self._emitted):]
    self._emitted = stable
    return new

  def finish(self) -> str:
    """The rest of the text (held-back bytes that never completed included)."""
    text = self._tokenizer.decode(self._ids)
    if not text.startswith(self._emitted):
      raise RuntimeError(f"the tokenizer decoded {self._ids} to {text!r}, which does not start "
                         f"with the text already streamed {self._emitted!r}")
    rest = text[len(self._emitted):]
    self._emitted = text
    return rest


@functools.lru_cache(maxsize=16)
def _stream_fns(model_config, max_new_tokens: int, params_tuple):
  """Jitted (first(params, tokens, mask, rng), step(params, cache, last, position, rng, step)).

  Built once per model and sampling setting; jit then compiles once per prompt width, and the
  prompt width is bucketed by `left_pad`. The math is `sampling.generate`'s, one token at a
  time: the same cache size, positions and per-step keys (fold_in(rng, step)), so with the same
  rng the stream and `answer` pick the same tokens.
  """
  params = sampling.SamplingParams(*params_tuple)

  def first(variables, tokens, mask, rng):
    b, p = tokens.shape
    cache = init_cache(model_config, b, p + max_new_tokens)
    logits, cache = sampling.prefill(variables, tokens, mask, cache, model_config=model_config)
    token = sampling.sample_logits(logits, jax.random.fold_in(rng, 0), params)  # [B]
    return token, cache

  def step(variables, cache, last, position, rng, index):
    logits, cache = sampling.decode_step(variables, cache, last, position,
                                         model_config=model_config)  # [B, V]
    token = sampling.sample_logits(logits, jax.random.fold_in(rng, index), params)  # [B]
    return token, cache

  options = sampling.decode_compiler_options()
  return (jax.jit(first, compiler_options=options),
          jax.jit(step, donate_argnums=1, compiler_options=options))


def stream_answer(params, model_config: ModelConfig, tokenizer, conversation, *, rng,
                  max_new_tokens: int = 48, temperature: float = 0.7, top_p: float = 0.95,
                  greedy: bool = False):
  """Yields the answer to one conversation (a prompt string or a message list) as text
  increments, token by token, until a stop id or `max_new_tokens`.

  The increments add up to what `answer` returns for the same conversation and rng; a Chinese
  character spread over several byte pieces arrives whole (see IncrementalDecoder).
  """
  if not 0 < max_new_tokens < model_config.max_len:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be in [1, max_len="
                     f"{model_config.max_len}): the prompt needs room too")
  messages = ([{"role": "user", "content": conversation}] if isinstance(conversation, str)
              else list(conversation))
  row = tokenizer.render_prompt(messages)[-(model_config.max_len - max_new_tokens):]
  tokens, mask = left_pad([row], tokenizer.pad_id)  # [1, P]
  first, step = _stream_fns(model_config, max_new_tokens, (temperature, 0, top_p, greedy))
  variables = {"params": params}
  stops = set(tokenizer.stop_ids())
  decoder = IncrementalDecoder(tokenizer)
  token, cache = first(variables, tokens, mask, rng)
  for index in range(1, max_new_tokens + 1):
    token_id = int(jax.device_get(token)[0])
    if token_id in stops:
      break
    piece = decoder.push(token_id)
    if piece:
      yield piece
    if index == max_new_tokens:
      break
    # The token emitted at column index - 1 sits at position len(row) + index - 1.
    position = np.full((1,), len(row) + index - 1, np.int32)
    token, cache = step(variables, cache, token, position, rng, index)
  rest = decoder.finish()
  if rest:
    yield rest
