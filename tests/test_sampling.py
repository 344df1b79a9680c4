"""The sampler against independent references: greedy decoding against argmax over full
forward passes with no cache, log-probs against log_softmax of those passes, top-k / top-p
against sets computed in numpy, and temperature sampling against softmax frequencies."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.infer import sampling
from rlhf_jax.models import Transformer, model_config
from rlhf_jax.infer.sampling import SamplingParams, filter_logits, make_generate_fn, sample_logits

V = 97
PAD = 0
N = 8  # new tokens
CFG = model_config("tiny", vocab_size=V)
# Gemma 3's layout with a window of 3 on layer 0: prompts of 7 and 8 new tokens run past it.
WINDOWED = model_config("tiny", vocab_size=V, sliding_window=3, local_layers=(0,),
                        rope_local_theta=500.0, qk_norm=True, norm_plus_one=True,
                        sandwich_norms=True, mlp_activation="gelu_tanh", embed_scale=True)


def _init(seed, cfg=CFG):
  """Random params with the model's own tree, drawn in numpy (compiling init costs seconds)."""
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens, tokens,
                                        tokens))
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "embedding" in name:
      x = rng.normal(0.0, 1.0, leaf.shape)
    elif "scale" in name:
      x = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    else:
      x = rng.normal(0.0, 0.1, leaf.shape)
    return jnp.asarray(x, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def params():
  return _init(0)


def _prompts(seed, lengths=(7, 4, 1), width=7):
  """Left-padded prompts [B, width] and their mask; the real tokens as Python lists."""
  rng = np.random.RandomState(seed)
  rows = [list(rng.randint(1, V, size=n)) for n in lengths]
  tokens = np.array([[PAD] * (width - len(r)) + r for r in rows], np.int32)
  mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32)
  return jnp.asarray(tokens), jnp.asarray(mask), rows


@functools.lru_cache(maxsize=None)
def _full_forward(cfg=CFG):
  """Logits [B, W, V] of unpadded rows (right-filled with segment 0), no cache."""
  return jax.jit(lambda p, t, s: Transformer(cfg).apply(p, t, jnp.arange(t.shape[1])[None], s)[0])


def _forward_rows(params, rows, width, cfg=CFG):
  """Full forward pass over each row's whole sequence; the last real position's logits [B, V]."""
  tokens = np.zeros((len(rows), width), np.int32)
  segments = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], segments[i, :len(r)] = r, 1
  return np.asarray(_full_forward(cfg)(params, jnp.asarray(tokens), jnp.asarray(segments)))


def _greedy_reference(params, rows, n, cfg=CFG):
  """Argmax over the full forward pass of the growing sequence, one token at a time."""
  seqs = [list(r) for r in rows]
  width = max(map(len, rows)) + n
  for _ in range(n):
    logits = _forward_rows(params, seqs, width, cfg)
    for i, s in enumerate(seqs):
      s.append(int(np.argmax(logits[i, len(s) - 1])))
  return np.array([s[len(r):] for s, r in zip(seqs, rows)])  # [B, n]


def _reference_logprobs(params, rows, generated, temperature):
  """log_softmax(logits / T) of the full forward pass at each generated token [B, n]."""
  seqs = [list(r) + list(g) for r, g in zip(rows, generated)]
  logits = _forward_rows(params, seqs, max(map(len, seqs))) / temperature
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  out = np.zeros(generated.shape, np.float32)
  for i, r in enumerate(rows):
    for j, tok in enumerate(generated[i]):
      out[i, j] = logp[i, len(r) + j - 1, tok]
  return out


def _generate(params, tokens, mask, seed=0, stop_ids=(), sp=SamplingParams(greedy=True)):
  fn = make_generate_fn(CFG, N, stop_ids, PAD, sp)
  return jax.tree.map(np.asarray, fn(params, tokens, mask, jax.random.key(seed)))


def _first_stop(row, stop_ids):
  """Number of tokens a row keeps: up to and including its first stop id (all if none)."""
  hits = np.flatnonzero(np.isin(row, stop_ids))
  return int(hits[0]) + 1 if hits.size else len(row)


def test_greedy_matches_full_forward_argmax_and_stops_per_row(params):
  tokens, mask, rows = _prompts(1)
  expected = _greedy_reference(params, rows, N)  # [B, N]
  # Plant stops: row 0's first new token at step 3 or later, and row 2's very first token
  # (the prefill's sample, outside the decode loop); row 1 must run the whole budget.
  step = next(s for s in range(3, N)
              if expected[0, s] not in expected[0, :s] and expected[0, s] not in expected[1])
  stop_ids = (int(expected[0, step]), int(expected[2, 0]), V + 5)  # an id never drawn is harmless
  lengths = [_first_stop(row, stop_ids) for row in expected]
  assert lengths[0] == step + 1 and lengths[1] == N and lengths[2] == 1, (lengths, expected)

  out = _generate(params, tokens, mask, stop_ids=stop_ids)
  np.testing.assert_array_equal(out["lengths"], lengths)
  ref_logprobs = _reference_logprobs(params, rows, expected, 1.0)
  for i, n in enumerate(lengths):
    np.testing.assert_array_equal(out["tokens"][i, :n], expected[i, :n])
    assert (out["tokens"][i, n:] == PAD).all()
    np.testing.assert_array_equal(out["mask"][i], [1] * n + [0] * (N - n))
    np.testing.assert_allclose(out["logprobs"][i, :n], ref_logprobs[i, :n], rtol=1e-5,
                               atol=1e-5)
    assert (out["logprobs"][i, n:] == 0).all()


def test_greedy_past_the_sliding_window_matches_full_forward_argmax():
  """A model with a sliding-window layer: the sampler's cache keeps every slot and its mask
  hides the keys that left the window, so decoding past it (left-padded rows of 7, 4 and 1
  prompt tokens, 8 new) equals argmax over full passes without a cache."""
  params = _init(3, WINDOWED)
  tokens, mask, rows = _prompts(4)
  expected = _greedy_reference(params, rows, N, WINDOWED)
  fn = make_generate_fn(WINDOWED, N, (), PAD, SamplingParams(greedy=True))
  out = fn(params, tokens, mask, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out["tokens"]), expected)


def test_top_k_one_generates_the_greedy_answer(params):
  tokens, mask, rows = _prompts(4)
  expected = _greedy_reference(params, rows, N)
  out = _generate(params, tokens, mask, seed=7, sp=SamplingParams(top_k=1))
  np.testing.assert_array_equal(out["tokens"], expected)
  assert (out["mask"] == 1).all() and (out["lengths"] == N).all()
  np.testing.assert_allclose(out["logprobs"], _reference_logprobs(params, rows, expected, 1.0),
                             rtol=1e-5, atol=1e-5)


def test_sampled_logprobs_match_temperature_scaled_full_forward(params):
  tokens, mask, rows = _prompts(2)
  sp = SamplingParams(temperature=0.7)
  out = _generate(params, tokens, mask, seed=3, sp=sp)
  assert (out["lengths"] == N).all()
  assert (out["tokens"] != _greedy_reference(params, rows, N)).any()  # it did sample
  expected = _reference_logprobs(params, rows, out["tokens"], 0.7)
  np.testing.assert_allclose(out["logprobs"], expected, rtol=1e-5, atol=1e-5)
  # Against the unscaled distribution they differ: the temperature is really applied.
  assert not np.allclose(out["logprobs"], _reference_logprobs(params, rows, out["tokens"], 1.0),
                         atol=1e-2)


def _softmax64(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _allowed_reference(logits, top_k, top_p):
  """The allowed token ids of one row, in numpy float64: top-k, then the nucleus of those."""
  order = np.argsort(-logits, kind="stable")
  candidates = order[:top_k] if top_k else order
  if top_p < 1.0:
    cumulative = np.cumsum(_softmax64(logits[candidates].astype(np.float64)))
    # Guard: no cumulative sum so close to top_p that float32 rounding could decide the cut.
    assert np.min(np.abs(cumulative - top_p)) > 1e-5
    candidates = candidates[:int(np.argmax(cumulative >= top_p)) + 1]
  return set(candidates.tolist())


def _logits(seed, rows=4, scale=2.0):
  return scale * np.random.RandomState(seed).randn(rows, V).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _draw_fn(sp: SamplingParams, draws: int):
  """Logits [B, V] -> (draws samples [draws, B], filter_logits' output [B, V]), one jit."""
  def draw(logits, rng):
    keys = jax.random.split(rng, draws)
    samples = jax.vmap(lambda k: sample_logits(logits, k, sp))(keys)
    return samples, filter_logits(logits / sp.temperature, sp.top_k, sp.top_p)
  return jax.jit(draw)


@pytest.mark.parametrize("top_k,top_p",
                         [(1, 1.0), (5, 1.0), (0, 0.9), (0, 0.3), (12, 0.8), (0, 0.02)])
def test_top_k_top_p_keep_exactly_the_reference_set(top_k, top_p):
  logits = _logits(11)
  sp = SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p)
  draws, filtered = map(np.asarray, _draw_fn(sp, 2000)(jnp.asarray(logits), jax.random.key(0)))
  if top_k == 1:  # top-1 sampling is greedy
    np.testing.assert_array_equal(draws, np.broadcast_to(np.argmax(logits, -1), draws.shape))
  for i, row in enumerate(logits):
    scaled = row / np.float32(0.9)
    allowed = _allowed_reference(scaled, top_k, top_p)
    kept = np.flatnonzero(np.isfinite(filtered[i]))
    assert set(kept.tolist()) == allowed
    np.testing.assert_allclose(filtered[i, kept], scaled[kept], rtol=1e-6)  # survivors unchanged
    drawn = set(np.unique(draws[:, i]).tolist())
    assert drawn <= allowed  # 2000 draws never leave the set ...
    # ... and every allowed token likely enough to show up in 2000 draws does show up.
    probs = _softmax64(scaled[sorted(allowed)].astype(np.float64))
    assert {t for t, q in zip(sorted(allowed), probs) if q > 0.01} <= drawn


def _chi_square(counts, probs, n):
  """Pearson's statistic and degrees of freedom, rare bins (expected < 5) pooled into one."""
  expected = probs * n
  common = expected >= 5
  obs = np.append(counts[common], counts[~common].sum())
  exp = np.append(expected[common], expected[~common].sum())
  return float(np.sum((obs - exp) ** 2 / exp)), len(obs) - 1


def test_temperature_sampling_frequencies_match_softmax():
  logits = _logits(13, rows=1, scale=1.5)
  n, temperature = 20000, 0.6
  draws = np.asarray(_draw_fn(SamplingParams(temperature=temperature), n)(
      jnp.asarray(logits), jax.random.key(3))[0])[:, 0]
  counts = np.bincount(draws, minlength=V).astype(np.float64)
  stat, dof = _chi_square(counts, _softmax64(logits[0].astype(np.float64) / temperature), n)
  assert stat < dof + 5 * np.sqrt(2 * dof)  # mean dof, sd sqrt(2 dof): a loose bound
  # The same check rejects the distribution at another temperature: it can fail.
  wrong, wrong_dof = _chi_square(counts, _softmax64(logits[0].astype(np.float64)), n)
  assert wrong > wrong_dof + 5 * np.sqrt(2 * wrong_dof)


def test_categorical_draw_across_blocks_matches_softmax():
  """The two-level inverse-CDF draw over a vocabulary of several blocks, not a multiple of the
  block size, with masked entries on both sides of a block boundary: masked tokens are never
  drawn and the frequencies pass a chi-square test against the float64 softmax (which rejects
  the same counts against the unmasked distribution, so the check can fail)."""
  from rlhf_jax.infer.sampling import DRAW_BLOCK, categorical_draw
  v = 2 * DRAW_BLOCK + 77
  rng = np.random.RandomState(5)
  logits = 2.0 * rng.randn(2, v).astype(np.float32)
  logits[0, DRAW_BLOCK - 3:DRAW_BLOCK + 3] = -np.inf  # straddles the first block boundary
  logits[1, :DRAW_BLOCK] = -np.inf  # a whole block masked
  logits[:, 40] += 6.0  # one likely token: probabilities from ~0.3 down to ~1e-6
  n = 60000
  draw = jax.jit(jax.vmap(lambda k: categorical_draw(k, jnp.asarray(logits))))
  draws = np.asarray(draw(jax.random.split(jax.random.key(7), n)))  # [n, 2]
  for row in range(2):
    counts = np.bincount(draws[:, row], minlength=v).astype(np.float64)
    assert counts[~np.isfinite(logits[row])].sum() == 0
    probs = _softmax64(np.where(np.isfinite(logits[row]), logits[row], -np.inf).astype(np.float64))
    stat, dof = _chi_square(counts, probs, n)
    assert stat < dof + 5 * np.sqrt(2 * dof)
  unmasked = _softmax64(np.where(np.isfinite(logits[1]), logits[1], 0.0).astype(np.float64))
  wrong, wrong_dof = _chi_square(np.bincount(draws[:, 1], minlength=v).astype(np.float64),
                                 unmasked, n)
  assert wrong > wrong_dof + 5 * np.sqrt(2 * wrong_dof)


def test_generate_compiles_once(params, monkeypatch):
  traces = []
  real_prefill = sampling.prefill

  def counting_prefill(*args, **kwargs):
    traces.append(1)  # runs only while tracing
    return real_prefill(*args, **kwargs)

  monkeypatch.setattr(sampling, "prefill", counting_prefill)
  fn = make_generate_fn(CFG, N, (3,), PAD, SamplingParams(temperature=0.8, top_p=0.9))
  tokens, mask, _ = _prompts(5)
  first = fn(params, tokens, mask, jax.random.key(0))
  other_tokens, other_mask, _ = _prompts(6, lengths=(2, 7, 5))
  second = fn(_init(1), other_tokens, other_mask, jax.random.key(1))
  jax.block_until_ready((first, second))
  assert len(traces) == 1 and fn._cache_size() == 1  # traced by the first call only
  assert not np.array_equal(first["tokens"], second["tokens"])


def test_a_scanned_model_samples_what_its_unrolled_twin_samples(params):
  """A model trained with scanned layers decodes unrolled (`unrolled_for_decoding`): the same
  params stacked give the same sampled tokens and log-probs as the unrolled model, and the
  decode loop holds no scan (each layer attends to its own cache arrays)."""
  import dataclasses
  from rlhf_jax.models import layer_layout
  scanned_cfg = dataclasses.replace(CFG, scan_layers=True)
  stacked = layer_layout.to_layout(params, scan=True)
  assert layer_layout.layout_of(stacked) is True
  tokens, mask, _ = _prompts(7)
  sp = SamplingParams(temperature=1.0)
  plain = make_generate_fn(CFG, N, (), PAD, sp)(params, tokens, mask, jax.random.key(3))
  fn = make_generate_fn(scanned_cfg, N, (), PAD, sp)
  scanned = fn(stacked, tokens, mask, jax.random.key(3))
  np.testing.assert_array_equal(scanned["tokens"], plain["tokens"])
  np.testing.assert_allclose(scanned["logprobs"], plain["logprobs"], rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda *a: sampling.generate(
      *a, model_config=scanned_cfg, max_new_tokens=N, stop_ids=(), pad_id=PAD, sampling=sp))(
          stacked, tokens, mask, jax.random.key(3)))
  assert "while" in jaxpr and " scan[" not in jaxpr
