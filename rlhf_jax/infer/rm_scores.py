"""The reward model as a function: score prompt + answer rows, and load a trained RM.

A score is the scalar head read at the last real token of prompt + answer (the <|end|> that
closes the answer), so a row may be left- or right-padded: only `mask` says where it ends; or,
for an RM trained with `score_pool="mean"` (its ModelConfig), the head's mean over the
answer's own tokens (`answer_mask`).
Training only pins score differences (the Bradley-Terry loss is shift-invariant), so after
training the RM is normalised: `gain * raw + bias` gives the SFT policy's own answers mean 0 and
std 1, which fixes the scale PPO's KL coefficient is measured against. The pair is stored in
`<workdir>/normalization.json` next to the RM's `checkpoints/`.

  model_config, params, gain, bias = load_reward_model("W/rm")
  scores = score_sequences(params, tokens, positions, segment_ids, mask,
                           model_config=model_config, gain=gain, bias=bias)  # [B]
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.core import metrics as metrics_lib
from rlhf_jax.models.heads import (ScalarModel, answer_mean_value, last_position,
                                   pooled_score)
from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.core import run_folder

log = logging.getLogger(__name__)

NORMALIZATION_FILE = "normalization.json"


def score_sequences(params, tokens, positions, segment_ids, mask, *, model_config: ModelConfig,
                    gain=1.0, bias=0.0, answer_mask=None):
  """Scores [B] of rows tokens/positions/segment_ids/mask [B, T]: gain * r + bias, where r is
  the ScalarModel value at the row's last real token (the right-most 1 of mask), or its mean
  over answer_mask [B, T] under model_config.score_pool="mean". Pure and jittable; `params` is
  the RM's {'trunk', 'head'} tree."""
  model = ScalarModel(model_config)
  if model_config.score_pool == "last":  # the last layer runs at that token only
    last = last_position(mask)[:, None]  # [B, 1]
    values = model.apply({"params": params}, tokens, positions, segment_ids, columns=last)
    return gain * values[:, 0] + bias  # [B]
  values = model.apply({"params": params}, tokens, positions, segment_ids)  # [B, T]
  return gain * pooled_score(values, mask, answer_mask, model_config.score_pool) + bias  # [B]


# ---------------------------------------------------------------------------------------------
# Normalisation.


def fit_normalization(raw_scores) -> dict:
  """{gain, bias, mean_raw, std_raw, n}: gain * raw + bias has mean 0, std 1 on `raw_scores`
  (population std). A sample with no spread cannot be scaled: that is an error, not a silent
  gain of infinity."""
  raw = np.asarray(raw_scores, np.float64).reshape(-1)
  if raw.size < 2 or not np.all(np.isfinite(raw)):
    raise ValueError(f"normalisation needs >= 2 finite scores, got {raw.size} "
                     f"({int(np.sum(~np.isfinite(raw)))} not finite)")
  mean, std = float(raw.mean()), float(raw.std())
  if std < 1e-8:
    raise ValueError(f"the RM gives every normalisation answer the same score ({mean:.6g}): "
                     "it cannot be scaled to std 1")
  return {"gain": 1.0 / std, "bias": -mean / std, "mean_raw": mean, "std_raw": std,
          "n": int(raw.size)}


def write_normalization(workdir: str, normalization: dict) -> str:
  path = os.path.join(workdir, NORMALIZATION_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({k: normalization[k] for k in ("gain", "bias", "mean_raw", "std_raw", "n")}, f,
              indent=1)
  os.replace(tmp, path)
  return path


def read_normalization(workdir: str) -> dict:
  path = os.path.join(workdir, NORMALIZATION_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"no {NORMALIZATION_FILE} in {workdir}: the RM run did not finish its normalisation "
        "step. Run the same reward command again in that workdir (it resumes and normalises), "
        "or pass require_normalization=False to get raw scores (gain 1, bias 0).")
  return metrics_lib.read_json(path)  # a bad file is an error naming it


# ---------------------------------------------------------------------------------------------
# Loading a trained RM.


def load_reward_model(workdir: str, *, require_normalization: bool = True, step=None):
  """(ModelConfig, params, gain, bias) of the RM trained in `workdir`, params on one device.

  Reads the run folder's latest step unless `step` (core/run_folder.py) and
  `normalization.json`.
  """
  params, model_config = run_folder.load_scalar_model(workdir, step)
  if require_normalization:
    norm = read_normalization(workdir)
    gain, bias = float(norm["gain"]), float(norm["bias"])
  else:
    gain, bias = 1.0, 0.0
  return model_config, params, gain, bias


def comparison_scores(params, batch, model: ScalarModel, rngs=None):
  """Raw scores [B, K]: the B*K answers of a batch in one forward pass, one row each; or, in
  the shared_prompt layout (a `score_at` [B, K] in the batch), one row per comparison, its
  prompt once and each answer after it seeing the prompt (data/rm_batches.py). rngs: a
  training forward's (LoRA dropout, train/state.dropout_rngs); None: deterministic."""
  rngs = rngs or {}
  pool = model.config.score_pool
  if "score_at" in batch:
    # "last": the last layer runs at the K scored slots only (Transformer.hidden_states).
    values = model.apply({"params": params}, batch["tokens"], batch["positions"],
                         batch["segment_ids"], prefix_ids=batch["prefix_ids"], rngs=rngs,
                         columns=batch["score_at"] if pool == "last" else None)
    if pool == "mean":  # values [B, T]; answer i's tokens: in segment 2 + i or shared (segment 1)
      k, seg = batch["score_at"].shape[1], batch["segment_ids"]
      mine = (seg[:, None, :] == 2 + jnp.arange(k)[None, :, None]) | (seg == 1)[:, None, :]
      own = mine & (batch["answer_mask"] > 0)[:, None, :]  # [B, K, T]
      return answer_mean_value(values[:, None, :], own)  # [B, K]
    return values  # [B, K]
  if pool != "last":
    raise ValueError(f"score_pool={pool!r} reads each answer's own tokens: the answers layout "
                     "does not mark them; use data.layout='shared_prompt'")
  b, k, t = batch["tokens"].shape
  flat = lambda x: x.reshape(b * k, t)  # noqa: E731
  last = last_position(flat(batch["segment_ids"]))[:, None]  # [B*K, 1]
  values = model.apply({"params": params}, flat(batch["tokens"]), flat(batch["positions"]),
                       flat(batch["segment_ids"]), columns=last, rngs=rngs)  # [B*K, 1]
  return values.reshape(b, k)  # [B, K]


# ---------------------------------------------------------------------------------------------
# Text in, scores out (evaluation, normalisation, tools).


def _messages(prompt) -> list:
  if isinstance(prompt, str):
    return [{"role": "user", "content": prompt}]
  return list(prompt)


def encode_answer(tokenizer, prompt, answer: str, seq_len: int) -> tuple[np.ndarray, bool]:
  """(ids [L <= seq_len], truncated) of prompt + answer in the chat template, ending on the
  answer's <|end|>. Too long: the prompt loses its oldest tokens (BOS is kept), so the answer,
  and the token the score is read at, survive."""
  ids, _, truncated = encode_scored(tokenizer, prompt, answer, seq_len)
  return ids, truncated


def encode_scored(tokenizer, prompt, answer: str, seq_len: int):
  """(ids [L], answer_mask [L] int32, truncated): `encode_answer`'s ids and which of them are
  the answer's own: the chat's last run of assistant-loss tokens (a template may close the turn
  with tokens outside the loss, as Gemma 3's newline after <end_of_turn>)."""
  ids, loss_mask = tokenizer.render_chat(_messages(prompt)
                                         + [{"role": "assistant", "content": answer}])
  answer_mask = np.zeros_like(ids)
  ones = np.flatnonzero(loss_mask)
  if len(ones):
    end = ones[-1] + 1
    zeros = np.flatnonzero(loss_mask[:end] == 0)
    answer_mask[(zeros[-1] + 1 if len(zeros) else 0):end] = 1
  if len(ids) <= seq_len:
    return ids, answer_mask, False
  keep = lambda x: np.concatenate([x[:1], x[len(x) - seq_len + 1:]]).astype(np.int32)  # noqa: E731
  return keep(ids), keep(answer_mask), True


def pad_rows(rows: Sequence[np.ndarray], seq_len: int, pad_id: int, n_rows: int | None = None,
             answer_masks: Sequence[np.ndarray] | None = None):
  """Right-padded [N, seq_len] tokens, positions, segment_ids and mask (int32) of id rows, and
  answer_mask where `answer_masks` are given; n_rows > len(rows) adds all-padding rows
  (mask 0)."""
  n = n_rows or len(rows)
  tokens = np.full((n, seq_len), pad_id, np.int32)
  mask = np.zeros((n, seq_len), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = 1
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  out = {"tokens": tokens, "positions": positions, "segment_ids": mask.copy(), "mask": mask}
  if answer_masks is not None:
    out["answer_mask"] = np.zeros((n, seq_len), np.int32)
    for i, row in enumerate(answer_masks):
      out["answer_mask"][i, :len(row)] = row
  return out


@functools.lru_cache(maxsize=8)
def jitted_score(model_config: ModelConfig):
  return jax.jit(functools.partial(score_sequences, model_config=model_config))


def score_texts(params, model_config: ModelConfig, tokenizer, prompts, answers, *,
                gain: float = 1.0, bias: float = 0.0, batch_size: int = 64,
                seq_len: int | None = None) -> np.ndarray:
  """float32 [N] scores of answers[i] to prompts[i] (a string or a message list).

  Rows are padded to a multiple of 16 tokens and batches to `batch_size`, so a few shapes are
  compiled, not one per call.
  """
  if len(prompts) != len(answers):
    raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers")
  seq_len = seq_len or model_config.max_len
  fn = jitted_score(model_config)
  out = []
  for start in range(0, len(answers), batch_size):
    encoded = [encode_scored(tokenizer, p, a, seq_len) for p, a in
               zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
    rows = [ids for ids, _, _ in encoded]
    width = min(seq_len, -(-max(len(r) for r in rows) // 16) * 16)
    batch = pad_rows(rows, width, tokenizer.pad_id, n_rows=batch_size,
                     answer_masks=[m for _, m, _ in encoded])
    scores = fn(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                batch["mask"], gain=jnp.float32(gain), bias=jnp.float32(bias),
                answer_mask=batch["answer_mask"])
    out.append(np.asarray(jax.device_get(scores))[:len(rows)])
  return np.concatenate(out).astype(np.float32) if out else np.zeros((0,), np.float32)

