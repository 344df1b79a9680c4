"""Rollouts: answers sampled to a batch of prompts, laid out as one sequence per episode.

Layout of an episode row (P prompt columns, N answer columns, S = P + N):

    tokens    pad pad <s> <|user|> ... <|assistant|> | a0 a1 ... <|end|> pad pad
    mask       0   0   1    1          1             |  1  1  ...   1     0   0
    positions  0   0   0    1  ...    L-1            |  L L+1 ...

Prompts are left-padded (the sampler needs every row's last prompt token in column P-1) and
answers right-padded, so a row is [left-padded prompt | right-padded answer] and column P-1+t
is always the input that predicts answer token t: the policy, reference and critic read their
answer-position outputs as one static column range, `answer_columns`. Positions are
`cumsum(mask) - 1`, exactly what the sampler used, so a full forward pass reproduces the
sampler's log-probs.

Answers are truncated at the first stop token by the sampler itself (its mask is 1 up to and
including the stop token); an answer that reached the length budget without one is flagged in
`ended`, so the reward can penalise it.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.infer import sampling
from rlhf_jax.models.transformer import ModelConfig, positions_from_mask

Array = jax.Array


class Rollout(NamedTuple):
  tokens: Array  # [B, S] int32: [left-padded prompt | right-padded answer]
  positions: Array  # [B, S] int32
  segment_ids: Array  # [B, S] int32: 1 on real tokens, 0 on padding (attention mask)
  answer_mask: Array  # [B, N] float32: 1 on real answer tokens (the stop token included)
  logprobs: Array  # [B, N] float32: the sampler's log π(a_t | ...) at its temperature; 0 on pad
  ended: Array  # [B] bool: the answer ends with a stop token within the budget

  @property
  def answer_tokens(self) -> Array:  # [B, N]
    return self.tokens[:, -self.answer_mask.shape[1]:]

  @property
  def row_answer_mask(self) -> Array:  # [B, S]: answer_mask where the answer sits in each row
    prompt = jnp.zeros((self.tokens.shape[0], self.tokens.shape[1] - self.answer_mask.shape[1]),
                       self.answer_mask.dtype)
    return jnp.concatenate([prompt, self.answer_mask], axis=1)

  @property
  def lengths(self) -> Array:  # [B]
    return jnp.sum(self.answer_mask, axis=-1)


def build_sequences(prompt_tokens: Array, prompt_mask: Array, answer_tokens: Array,
                    answer_mask: Array) -> tuple[Array, Array, Array]:
  """(tokens, positions, segment_ids), each [B, P + N], of prompts [B, P] + answers [B, N]."""
  tokens = jnp.concatenate([prompt_tokens, answer_tokens], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, answer_mask], axis=1).astype(jnp.int32)
  return tokens, positions_from_mask(mask), mask


def ends_with_stop(answer_tokens: Array, answer_mask: Array, stop_ids) -> Array:
  """[B] bool: the last real answer token is one of stop_ids."""
  length = jnp.sum(answer_mask.astype(jnp.int32), axis=-1)  # [B]
  last = jnp.take_along_axis(answer_tokens, jnp.maximum(length - 1, 0)[:, None], axis=1)[:, 0]
  is_stop = jnp.isin(last, jnp.asarray(tuple(stop_ids), jnp.int32)) if stop_ids else False
  return (length > 0) & is_stop


def answer_columns(seq_len: int, n_answer: int) -> tuple[int, int]:
  """(start, stop) of the columns whose outputs predict the answer tokens: the output at
  column P-1+t is about answer token t (for a policy: its distribution). Static."""
  return seq_len - n_answer - 1, seq_len - 1



def sample_rollout(params, prompt_tokens: Array, prompt_mask: Array, rng: Array, *,
                   model_config: ModelConfig, max_new_tokens: int, stop_ids: tuple[int, ...],
                   pad_id: int, sampling_params: sampling.SamplingParams) -> Rollout:
  """Samples one answer per left-padded prompt [B, P] and lays out the episodes.

  params: {'params': policy params}. Jit it with everything after `rng` static (see
  `make_rollout_fn`).
  """
  out = sampling.generate(params, prompt_tokens, prompt_mask, rng, model_config=model_config,
                          max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                          sampling=sampling_params)
  answer_mask = out["mask"].astype(jnp.float32)
  tokens, positions, segment_ids = build_sequences(prompt_tokens, prompt_mask, out["tokens"],
                                                   out["mask"])
  return Rollout(tokens=tokens, positions=positions, segment_ids=segment_ids,
                 answer_mask=answer_mask, logprobs=out["logprobs"],
                 ended=ends_with_stop(out["tokens"], out["mask"], stop_ids))


@functools.lru_cache(maxsize=32)
def make_rollout_fn(model_config: ModelConfig, max_new_tokens: int, stop_ids, pad_id: int,
                    sampling_params: sampling.SamplingParams):
  """jit(fn(params, prompt_tokens, prompt_mask, rng) -> Rollout); compiles once per shape.

  Cached: the same settings give the same jitted function, so evaluation and training (or two
  runs in one process) share compilations.
  """
  return jax.jit(functools.partial(
      sample_rollout, model_config=model_config, max_new_tokens=max_new_tokens,
      stop_ids=tuple(int(s) for s in stop_ids), pad_id=pad_id, sampling_params=sampling_params),
      compiler_options=sampling.decode_compiler_options())
