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

from rlhf_jax import sampling
from rlhf_jax.models import ModelConfig


def left_pad(rows: Sequence[np.ndarray], pad_id: int, bucket: int = 16):
  """[B, P] tokens and mask, each row right-aligned; P a multiple of `bucket`."""
  longest = max(len(r) for r in rows)
  width = -(-longest // bucket) * bucket
  tokens = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    tokens[i, width - len(row):] = row
    mask[i, width - len(row):] = 1
  return tokens, mask


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
