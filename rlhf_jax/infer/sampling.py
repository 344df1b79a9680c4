"""Autoregressive sampling: a jitted prefill, then a `lax.while_loop` decode over a KV cache.

Prompts are left-padded, so every row's last prompt token sits in the last column and all rows
write the cache at the same slot; the cache holds `P + max_new_tokens` slots and each decode
step attends over all of them (unfilled slots are masked by the model), so a step costs the same
at the start of an answer as at its end.

The returned log-probs are `log_softmax(logits / temperature)[token]` over the whole vocabulary,
before top-k / top-p filtering: that is the policy PPO optimises, so the sampler's log-probs can
stand in for the "old" log-probs of a rollout without another forward pass.

Calls:
  fn = make_generate_fn(model_config, max_new_tokens, stop_ids, pad_id, SamplingParams(...))
  out = fn(params, prompt_tokens, prompt_mask, rng)  # {'tokens', 'logprobs', 'mask', 'lengths'}
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax.models import layer_layout
from rlhf_jax.models.transformer import (Cache, ModelConfig, Transformer, init_cache,
                                         positions_from_mask)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick the next token. Frozen and hashable: it is a static argument of jitted code.

  temperature also scales the logits the returned log-probs come from, greedy decoding included.
  The filters act on softmax(logits / temperature); top_k = 0 and top_p = 1.0 switch them off.
  With both set, top-k is applied first and the nucleus is taken from the renormalised top-k
  distribution.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), "
                       f"got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 switches it off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 switches it off), got {self.top_p}")


def filter_logits(logits: Array, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Logits [..., V] with the tokens outside the top-k / nucleus set at -inf.

  Nucleus: the smallest set of highest-probability tokens whose cumulative probability reaches
  top_p; the most likely token is always kept. Ties at the cut-off are all kept.
  """
  vocab = logits.shape[-1]
  ranked = None  # the candidates' logits, descending [..., K]
  if 0 < top_k < vocab:
    ranked = jax.lax.top_k(logits, top_k)[0]
    logits = jnp.where(logits >= ranked[..., -1:], logits, -jnp.inf)
  if top_p < 1.0:
    if ranked is None:
      ranked = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumulative sum
    keep = (mass_before < top_p) & (ranked > -jnp.inf)
    keep = keep.at[..., 0].set(True)
    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return logits


DRAW_BLOCK = 512  # vocabulary entries per block of `categorical_draw`'s two-level search


def categorical_draw(rng: Array, logits: Array) -> Array:
  """One token per row [B] from softmax(logits [B, V]) (-inf entries are never drawn).

  Inverse CDF with one uniform number per row, searched in two levels: which block of
  DRAW_BLOCK entries holds the draw (cumulative sums of the block sums), then where inside it.
  The same distribution as `jax.random.categorical`, which draws a Gumbel number for every
  entry: over Gemma 3's 262k vocabulary that is 8M random numbers for 32 rows, and on a 2-core
  CPU it cost more than the vocabulary projection itself (0.7 s against 0.25 s for a plain
  cumulative sum, 32 rows, benchmarks/generate.py).
  """
  b, v = logits.shape
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V], 0 at -inf
  pad = (-v) % DRAW_BLOCK
  blocks = jnp.pad(weights, ((0, 0), (0, pad))).reshape(b, -1, DRAW_BLOCK)  # [B, NB, K]
  block_sums = blocks.sum(axis=-1)  # [B, NB]
  block_ends = jnp.cumsum(block_sums, axis=-1)  # [B, NB]
  u = jax.random.uniform(rng, (b, 1)) * block_ends[:, -1:]  # [B, 1], in [0, total)
  block = jnp.minimum(jnp.sum(block_ends <= u, axis=-1), block_ends.shape[1] - 1)  # [B]
  rows = jnp.arange(b)
  start = block_ends[rows, block] - block_sums[rows, block]  # [B] mass before the block
  inner_ends = start[:, None] + jnp.cumsum(blocks[rows, block], axis=-1)  # [B, K]
  inner = jnp.minimum(jnp.sum(inner_ends <= u, axis=-1), DRAW_BLOCK - 1)  # [B]
  token = jnp.minimum(block * DRAW_BLOCK + inner, v - 1)
  # Rounding can put u at the very end of the mass (probability ~2^-24): never return a token
  # of weight zero, take the most likely one instead.
  drawn = jnp.take_along_axis(weights, token[:, None], axis=-1)[:, 0]
  return jnp.where(drawn > 0, token, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _scaled_sample(logits: Array, rng: Array, sampling: SamplingParams) -> tuple[Array, Array]:
  """(tokens [B], temperature-scaled float32 logits [B, V]); the latter give the log-probs."""
  scaled = logits.astype(jnp.float32) / sampling.temperature  # [B, V]
  if sampling.greedy:
    return jnp.argmax(scaled, axis=-1).astype(jnp.int32), scaled
  allowed = filter_logits(scaled, sampling.top_k, sampling.top_p)
  return categorical_draw(rng, allowed), scaled


def sample_logits(logits: Array, rng: Array, sampling: SamplingParams) -> Array:
  """Next tokens [B] from logits [B, V]: argmax, or a draw from the filtered softmax(logits/T)."""
  return _scaled_sample(logits, rng, sampling)[0]


def prefill(params, prompt_tokens: Array, prompt_mask: Array, cache: Cache, *,
            model_config: ModelConfig) -> tuple[Array, Cache]:
  """Writes the prompt [B, P] into the cache; returns the next-token logits [B, V].

  Only the last column goes through the vocabulary projection: with left padding it holds
  every row's last real token (each row needs at least one).
  """
  model = Transformer(model_config)
  mask = prompt_mask.astype(jnp.int32)
  p = prompt_tokens.shape[1]
  hidden, cache = model.apply(params, prompt_tokens, positions_from_mask(mask), mask, cache,
                              columns=(p - 1, p), method=Transformer.hidden_states)  # [B, 1, D]
  logits = model.apply(params, hidden[:, 0], method=Transformer.project)  # [B, V]
  return logits, cache


def decode_step(params, cache: Cache, tokens: Array, positions: Array, *,
                model_config: ModelConfig) -> tuple[Array, Cache]:
  """One token per row, tokens/positions [B], at slot cache['index']; logits [B, V]."""
  segment = jnp.ones_like(tokens)[:, None]  # [B, 1]
  logits, cache = Transformer(model_config).apply(
      params, tokens[:, None], positions[:, None], segment, cache)  # [B, 1, V]
  return logits[:, 0], cache


class _DecodeState(NamedTuple):
  step: Array  # [] the next output column to fill
  cache: Cache
  last: Array  # [B] the token emitted at step - 1 (the model's next input)
  done: Array  # [B] bool, the row has emitted a stop id
  tokens: Array  # [B, N]
  logprobs: Array  # [B, N]
  mask: Array  # [B, N]


def _emit(state: _DecodeState, logits: Array, rng: Array, sampling: SamplingParams,
          stop_ids: tuple[int, ...], pad_id: int) -> _DecodeState:
  """Samples column `state.step` from logits [B, V] and records it for rows still running."""
  step = state.step
  token, scaled = _scaled_sample(logits, jax.random.fold_in(rng, step), sampling)  # [B]
  logprob = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), token[:, None], axis=-1)
  live = ~state.done  # [B]
  stopped = jnp.isin(token, jnp.asarray(stop_ids, jnp.int32)) if stop_ids else jnp.zeros_like(live)
  return state._replace(
      step=step + 1,
      last=token,
      done=state.done | stopped,
      tokens=state.tokens.at[:, step].set(jnp.where(live, token, pad_id)),
      logprobs=state.logprobs.at[:, step].set(jnp.where(live, logprob[:, 0], 0.0)),
      mask=state.mask.at[:, step].set(live.astype(jnp.int32)))


def generate(params, prompt_tokens: Array, prompt_mask: Array, rng: Array, *,
             model_config: ModelConfig, max_new_tokens: int, stop_ids: tuple[int, ...],
             pad_id: int, sampling: SamplingParams, cache_dtype=None) -> dict:
  """Samples up to max_new_tokens per row after left-padded prompts [B, P].

  Stops when every row has emitted one of stop_ids or the budget is spent. Returns
    tokens   [B, N] int32, pad_id after a row's stop token;
    logprobs [B, N] float32, log_softmax(logits / temperature)[token], 0 where mask is 0;
    mask     [B, N] int32, 1 on generated tokens, the stop token included;
    lengths  [B] int32, the number of generated tokens.
  jit it with everything after `rng` static, or use make_generate_fn.
  """
  b, p = prompt_tokens.shape
  n = max_new_tokens
  stop_ids = tuple(int(s) for s in stop_ids)
  params, model_config = unrolled_for_decoding(params, model_config)
  cache = init_cache(model_config, b, p + n, cache_dtype)
  logits, cache = prefill(params, prompt_tokens, prompt_mask, cache, model_config=model_config)
  prompt_len = jnp.sum(prompt_mask.astype(jnp.int32), axis=-1)  # [B]
  emit = functools.partial(_emit, rng=rng, sampling=sampling, stop_ids=stop_ids, pad_id=pad_id)

  state = emit(_DecodeState(
      step=jnp.zeros((), jnp.int32), cache=cache, last=jnp.zeros((b,), jnp.int32),
      done=jnp.zeros((b,), bool), tokens=jnp.full((b, n), pad_id, jnp.int32),
      logprobs=jnp.zeros((b, n), jnp.float32), mask=jnp.zeros((b, n), jnp.int32)), logits)

  def running(s: _DecodeState) -> Array:
    return (s.step < n) & ~jnp.all(s.done)

  def advance(s: _DecodeState) -> _DecodeState:
    # The token emitted at column step - 1 sits at position prompt_len + step - 1.
    logits, cache = decode_step(params, s.cache, s.last, prompt_len + s.step - 1,
                                model_config=model_config)
    return emit(s._replace(cache=cache), logits)

  state = jax.lax.while_loop(running, advance, state)
  return {"tokens": state.tokens, "logprobs": state.logprobs, "mask": state.mask,
          "lengths": jnp.sum(state.mask, axis=-1)}


def decode_compiler_options() -> Optional[dict]:
  """XLA options for every jitted sampler (`jax.jit(..., compiler_options=...)`).

  On the CPU, decoding's matmuls are thin (one token per row: [B, D] x [D, F] with B of 16-32)
  and XLA's YNNPACK dot kernels, the default and the faster choice for training's wide matmuls,
  run them at a third of the rate of XLA's Eigen kernels: a Gemma 3 270M logits projection of 32
  rows over 262,144 pieces took 726 ms against 225 ms (benchmarks/RESULTS.md). So samplers keep
  YNNPACK for reductions only. Other backends get no options.
  """
  if jax.default_backend() != "cpu":
    return None
  return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def unrolled_for_decoding(params, model_config: ModelConfig):
  """(params, config) with the layers unrolled, whatever layout the model trains in.

  A scanned decode step must copy each layer's slice of the stacked KV cache out of the loop's
  carry before attending to it (XLA copies the whole carry when the attention reads it in
  place), while unrolled layers each attend to their own cache arrays in place
  (models/kv_cache.py): at SmolLM2-135M's shape a decode step takes ~265 ms unrolled against
  ~345 ms scanned (benchmarks/RESULTS.md). Unstacking the params costs one copy of the layers'
  weights per `generate` call, inside the jitted function.
  """
  if not model_config.scan_layers:
    return params, model_config
  return (layer_layout.to_layout(params, scan=False),
          dataclasses.replace(model_config, scan_layers=False))


def make_generate_fn(model_config: ModelConfig, max_new_tokens: int, stop_ids: tuple[int, ...],
                     pad_id: int, sampling: SamplingParams, cache_dtype=None):
  """A jitted fn(params, prompt_tokens, prompt_mask, rng) -> generate's dict.

  Build it once per configuration and keep it: it compiles once per prompt shape.
  """
  return jax.jit(functools.partial(
      generate, model_config=model_config, max_new_tokens=max_new_tokens,
      stop_ids=tuple(int(s) for s in stop_ids), pad_id=pad_id, sampling=sampling,
      cache_dtype=cache_dtype), compiler_options=decode_compiler_options())
