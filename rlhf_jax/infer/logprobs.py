"""log π(answer | prompt) of whole answers: what DPO and KTO compare between policy and reference.

Rows use the rollout layout (rlhf_jax/infer/rollout.py): a left-padded prompt in P columns, then a
right-padded answer in N columns,

    tokens       pad <s> <|user|> ... <|assistant|> | a0 a1 ... <|end|> pad
    segment_ids   0   1     1           1           |  1  1  ...   1     0
    answer_mask                                     |  1  1  ...   1     0     [B, N]

so the output at column P-1+t is the distribution of answer token t for every row alike: only
the N answer columns go through the vocabulary projection (one static column range,
`answer_columns`, which also spares the last layer the prompt's columns), not the whole row.
The answer is the chat template's assistant turn, <|end|> included: that the
model stops there is part of what a like or a preference rewards.

Building the rows is host work (`encode_prompt_answer`, `layout_rows`); the log-probs are a pure
function (`sequence_logprobs`) to be called inside jitted steps.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import chunked
from rlhf_jax.models.transformer import ModelConfig, Transformer, positions_from_mask
from rlhf_jax.infer.rollout import answer_columns

Array = jax.Array


def as_messages(prompt: str | Sequence[Mapping[str, str]]) -> list[dict]:
  """A prompt string is one user turn; a list of messages (ending with a user turn) is kept."""
  if isinstance(prompt, str):
    return [{"role": "user", "content": prompt}]
  return [dict(m) for m in prompt]


def encode_prompt_answer(tokenizer, prompt, answer: str, *, max_prompt_len: int,
                         max_answer_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """(prompt ids [<= P], answer ids [<= N], truncated) of one (prompt, answer) pair.

  prompt ids = `tokenizer.render_prompt(messages)`; answer ids = the assistant turn's tokens
  that the template trains (its content and the <|end|> that closes it), read off
  `render_chat(messages + [answer])` so any tokenizer behind the interface agrees with what
  SFT trained. Too long: the prompt loses its oldest tokens (BOS kept, as the reward model's
  rows do) and the answer its end; either is reported in `truncated`.
  """
  messages = as_messages(prompt)
  prompt_ids = np.asarray(tokenizer.render_prompt(messages), np.int32)
  full, mask = tokenizer.render_chat(messages + [{"role": "assistant", "content": answer}])
  full, mask = np.asarray(full, np.int32), np.asarray(mask, np.int32)
  n = len(prompt_ids)
  if not np.array_equal(full[:n], prompt_ids):
    raise ValueError("the tokenizer's render_prompt is not a prefix of its render_chat: "
                     "answers cannot be scored under this chat template")
  trained = np.nonzero(mask[n:])[0]
  answer_ids = full[n:n + (int(trained[-1]) + 1 if len(trained) else 0)]
  truncated = False
  if len(prompt_ids) > max_prompt_len:
    prompt_ids = np.concatenate([prompt_ids[:1], prompt_ids[len(prompt_ids) - max_prompt_len + 1:]])
    truncated = True
  if len(answer_ids) > max_answer_len:
    answer_ids = answer_ids[:max_answer_len]
    truncated = True
  return prompt_ids, answer_ids, truncated


def layout_rows(prompts: Sequence[np.ndarray], answers: Sequence[np.ndarray], *,
                max_prompt_len: int, max_answer_len: int, pad_id: int,
                n_rows: int | None = None) -> dict[str, np.ndarray]:
  """numpy rows in the module's layout: tokens, positions, segment_ids [R, P + N] int32 and
  answer_mask [R, N] float32. Rows beyond len(prompts) (up to n_rows) are all padding."""
  p, n = max_prompt_len, max_answer_len
  rows = n_rows or len(prompts)
  tokens = np.full((rows, p + n), pad_id, np.int32)
  segment_ids = np.zeros((rows, p + n), np.int32)
  for i, (prompt, answer) in enumerate(zip(prompts, answers)):
    tokens[i, p - len(prompt):p] = prompt
    tokens[i, p:p + len(answer)] = answer
    segment_ids[i, p - len(prompt):p + len(answer)] = 1
  positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
  return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
          "answer_mask": segment_ids[:, p:].astype(np.float32)}


def sequence_logprobs(params, tokens: Array, positions: Array, segment_ids: Array,
                      answer_mask: Array, *, model_config: ModelConfig,
                      vocab_chunk: int | None = None, rngs=None) -> Array:
  """Σ_t log π(a_t | prompt, a_<t) [R] (float32) over the real answer tokens of each row.

  tokens, positions, segment_ids [R, P + N]; answer_mask [R, N]. Pure and jittable; the
  vocabulary projection runs on the N answer columns only. vocab_chunk: columns per step of
  the chunked projection (rlhf_jax/models/chunked.py); None: the config's, 0: unchunked.
  rngs: a training forward's (LoRA dropout, train/state.dropout_rngs); None: deterministic.
  """
  model = Transformer(model_config)
  n = answer_mask.shape[-1]
  hidden, _ = model.apply({"params": params}, tokens, positions, segment_ids,
                          columns=answer_columns(tokens.shape[1], n),
                          method=Transformer.hidden_states, rngs=rngs or {})  # [R, N, D]
  # [R, N]; over vocabulary chunks when the config asks (ModelConfig.vocab_chunk), else
  # through the whole logits [R, N, V]
  logp, _ = chunked.model_logit_stats(params, hidden, tokens[:, -n:], model_config=model_config,
                                      chunk=vocab_chunk)
  return jnp.sum(logp * answer_mask.astype(jnp.float32), axis=-1)


def mismatched_rows(rows: Mapping[str, Array], n_answer: int, shift: int = 1) -> dict[str, Array]:
  """Rows pairing prompt i with the answer of row i + shift (cyclically): the (prompt, answer)
  pairs that nobody gave, whose policy/reference log-ratio estimates KL(π ‖ π_ref) for KTO.

  Works on device arrays inside a jitted step: the prompt half of each row is kept, the answer
  half rolled along the batch, and positions recomputed from the new padding.
  """
  def roll(x):
    return jnp.roll(x, -shift, axis=0)

  tokens = jnp.concatenate([rows["tokens"][:, :-n_answer], roll(rows["tokens"][:, -n_answer:])],
                           axis=1)
  segment_ids = jnp.concatenate([rows["segment_ids"][:, :-n_answer],
                                 roll(rows["segment_ids"][:, -n_answer:])], axis=1)
  return {"tokens": tokens, "positions": positions_from_mask(segment_ids),
          "segment_ids": segment_ids, "answer_mask": roll(rows["answer_mask"])}


def row_args(rows: Mapping[str, Any]) -> tuple:
  """(tokens, positions, segment_ids, answer_mask) of a rows dict, in sequence_logprobs' order."""
  return rows["tokens"], rows["positions"], rows["segment_ids"], rows["answer_mask"]
