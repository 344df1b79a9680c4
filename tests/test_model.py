"""The transformer against itself run differently: with and without a KV cache, padding,
packing, remat and scanned layers must all compute the same function; parameter and FLOP counts
are checked against independent counts (abstract shapes, a hand count, the traced matmuls)."""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import SIZES, Transformer, init_cache, model_config, positions_from_mask

V = 97


def _left_padded(rng, lengths, width):
  """Random tokens [B, width] in [1, V) with row i's lengths[i] real tokens at the right."""
  tokens = rng.randint(1, V, size=(len(lengths), width))
  mask = np.array([[0] * (width - n) + [1] * n for n in lengths])
  return jnp.asarray(tokens * mask, jnp.int32), jnp.asarray(mask, jnp.int32)


def _init(cfg, seed=0):
  """Random params with the model's own tree, drawn in numpy.

  The tree comes from an abstract init; filling it in numpy skips compiling the RNG-heavy init
  (seconds per config on a small CPU). Norm scales and biases are random too, so every
  parameter matters to the checks.
  """
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


def _n_params(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _stack_layers(params, n_layers):
  """Unscanned params -> the scanned layout: layer_i trees stacked under layers/block."""
  inner = dict(params["params"])
  layers = [inner.pop(f"layer_{i}") for i in range(n_layers)]
  inner["layers"] = {"block": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
  return {"params": inner}


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  """jitted (params, tokens, positions, segments, cache) -> (hidden, logits, cache)."""
  model = Transformer(cfg)

  def forward(params, tokens, positions, segments, cache=None):
    hidden, cache = model.apply(params, tokens, positions, segments, cache,
                                method=Transformer.hidden_states)
    return hidden, model.apply(params, hidden, method=Transformer.project), cache
  return jax.jit(forward)


TINY = model_config("tiny", vocab_size=V)


@pytest.fixture(scope="module")
def tiny_params():
  return _init(TINY)


def test_kv_cache_decoding_matches_full_forward(tiny_params):
  width, split = 12, 5
  tokens, mask = _left_padded(np.random.RandomState(1), [12, 9, 4], width)
  positions = positions_from_mask(mask)
  _, full, _ = _forward(TINY)(tiny_params, tokens, positions, mask)  # [B, T, V], no cache
  real = np.asarray(mask, bool)

  for scan_layers in (False, True):
    cfg = model_config("tiny", vocab_size=V, scan_layers=scan_layers)
    params = _stack_layers(tiny_params, cfg.n_layers) if scan_layers else tiny_params
    forward = _forward(cfg)
    cache = init_cache(cfg, tokens.shape[0], width + 3)  # spare slots stay empty
    _, logits, cache = forward(params, tokens[:, :split], positions[:, :split], mask[:, :split],
                               cache)
    pieces = [logits]
    for t in range(split, width):  # one token at a time; row 2 still decodes padding at t < 8
      _, logits, cache = forward(params, tokens[:, t:t + 1], positions[:, t:t + 1],
                                 mask[:, t:t + 1], cache)
      pieces.append(logits)
    cached = np.asarray(jnp.concatenate(pieces, axis=1))
    assert int(cache["index"]) == width
    np.testing.assert_allclose(cached[real], np.asarray(full)[real], rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_without_grouped_heads_matches_full_forward():
  """As many KV heads as query heads (one query per KV head): the one-token attention takes
  its own branch there (models/kv_cache.attend_one), so it is checked on its own."""
  cfg = model_config("tiny", vocab_size=V, n_kv_heads=4)
  assert cfg.n_heads == cfg.n_kv_heads
  params = _init(cfg, seed=3)
  width, split = 10, 4
  tokens, mask = _left_padded(np.random.RandomState(4), [10, 7, 3], width)
  positions = positions_from_mask(mask)
  forward = _forward(cfg)
  _, full, _ = forward(params, tokens, positions, mask)
  cache = init_cache(cfg, tokens.shape[0], width)
  _, logits, cache = forward(params, tokens[:, :split], positions[:, :split], mask[:, :split],
                             cache)
  pieces = [logits]
  for t in range(split, width):
    _, logits, cache = forward(params, tokens[:, t:t + 1], positions[:, t:t + 1],
                               mask[:, t:t + 1], cache)
    pieces.append(logits)
  real = np.asarray(mask, bool)
  cached = np.asarray(jnp.concatenate(pieces, axis=1))
  np.testing.assert_allclose(cached[real], np.asarray(full)[real], rtol=1e-5, atol=1e-5)


def test_left_padding_does_not_change_real_positions(tiny_params):
  forward = _forward(TINY)
  seq = list(np.random.RandomState(2).randint(1, V, size=9))
  width = len(seq) + 7
  # Rows with 0, 3 and 7 pads on the left; trailing segment-0 filler gives them one width.
  rows = [[0] * pads + seq + [0] * (7 - pads) for pads in (0, 3, 7)]
  masks = [[0] * pads + [1] * len(seq) + [0] * (7 - pads) for pads in (0, 3, 7)]
  mask = jnp.asarray(masks, jnp.int32)
  positions = jnp.asarray([[0] * pads + list(range(len(seq))) + [0] * (7 - pads)
                           for pads in (0, 3, 7)], jnp.int32)
  hidden, logits, _ = forward(tiny_params, jnp.asarray(rows, jnp.int32), positions, mask)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  # The reference: the prompt alone, with no padding at all.
  alone = jnp.asarray([seq], jnp.int32)
  ref_hidden, ref_logits, _ = forward(tiny_params, alone, jnp.arange(len(seq))[None],
                                      jnp.ones_like(alone))
  ref_logprobs = jax.nn.log_softmax(ref_logits, axis=-1)[0]
  assert width == hidden.shape[1]
  for i, pads in enumerate((0, 3, 7)):
    real = slice(pads, pads + len(seq))
    np.testing.assert_allclose(hidden[i, real], ref_hidden[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logprobs[i, real], ref_logprobs, rtol=1e-5, atol=1e-5)


def test_packed_sequences_match_separate_runs(tiny_params):
  forward = _forward(TINY)
  rng = np.random.RandomState(3)
  a, b = list(rng.randint(1, V, size=5)), list(rng.randint(1, V, size=7))
  # Each alone, one per row (a right-filled with segment 0, which a causal mask never sees).
  alone_tokens = jnp.asarray([a + [0, 0], b], jnp.int32)
  alone_segments = jnp.asarray([[1] * 5 + [0, 0], [1] * 7], jnp.int32)
  _, alone, _ = forward(tiny_params, alone_tokens, jnp.arange(7)[None].repeat(2, 0),
                        alone_segments)

  pad = 3  # trailing padding, segment 0
  tokens = jnp.asarray([a + b + [0] * pad], jnp.int32)
  segments = jnp.asarray([[1] * 5 + [2] * 7 + [0] * pad], jnp.int32)
  positions = jnp.asarray([list(range(5)) + list(range(7)) + [0] * pad], jnp.int32)
  _, packed, _ = forward(tiny_params, tokens, positions, segments)
  np.testing.assert_allclose(packed[0, :5], alone[0, :5], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 5:12], alone[1], rtol=1e-5, atol=1e-5)


def _loss_and_grads(cfg, params, tokens, positions, mask):
  def loss(p):
    logits, _ = Transformer(cfg).apply(p, tokens, positions, mask)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) * mask), logits
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def test_remat_gives_same_logits_and_grads(tiny_params):
  tokens, mask = _left_padded(np.random.RandomState(4), [8, 5], 8)
  positions = positions_from_mask(mask)
  (loss, logits), grads = _loss_and_grads(TINY, tiny_params, tokens, positions, mask)
  stacked_grads = _stack_layers(grads, TINY.n_layers)
  for scan_layers in (False, True):
    cfg = model_config("tiny", vocab_size=V, scan_layers=scan_layers, remat=True)
    params = _stack_layers(tiny_params, cfg.n_layers) if scan_layers else tiny_params
    (loss_r, logits_r), grads_r = _loss_and_grads(cfg, params, tokens, positions, mask)
    np.testing.assert_allclose(logits_r, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6, atol=1e-6)
    reference = stacked_grads if scan_layers else grads
    assert jax.tree.structure(grads_r) == jax.tree.structure(reference)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=1e-5, atol=1e-6 * max(1.0, float(np.max(np.abs(y))))), grads_r, reference)


@pytest.mark.parametrize("variant", ["plain", "remat", "scan"])
def test_read_columns_equal_the_full_pass_sliced(tiny_params, variant):
  """hidden_states(columns=(a, b)) runs the last layer on columns a..b-1 only; its values and
  the gradients of a loss on them equal the full pass sliced (remat / scan: sliced after)."""
  cfg = model_config("tiny", vocab_size=V, remat=variant == "remat", scan_layers=variant == "scan")
  params = _stack_layers(tiny_params, cfg.n_layers) if variant == "scan" else tiny_params
  tokens, mask = _left_padded(np.random.RandomState(6), [11, 7, 3], 12)
  positions = positions_from_mask(mask)
  model = Transformer(cfg)
  weights = jnp.asarray(np.random.RandomState(7).normal(size=(cfg.d_model,)), jnp.float32)

  def loss(p, columns):
    hidden, _ = model.apply(p, tokens, positions, mask, columns=columns,
                            method=Transformer.hidden_states)
    if columns is None:
      hidden = hidden[:, 4:11]
    return jnp.sum(jnp.tanh(hidden @ weights)), hidden

  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (full, h_full), g_full = value_and_grad(params, None)
  (part, h_part), g_part = value_and_grad(params, (4, 11))
  assert h_part.shape == (3, 7, cfg.d_model)
  np.testing.assert_allclose(h_part, h_full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(part, full, rtol=1e-5)
  # Relative to each gradient's size: another CPU's kernels (AVX2 vs AVX-512, or XLA's
  # --xla_cpu_max_isa=SSE4_2) sum in another order, and an element is a sum of terms the size
  # of the tensor's largest: at max ~4.5 a 0.13 element moved by 8e-6 (2e-6 of the max).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      x, y, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(y)))), g_part, g_full)


@pytest.mark.parametrize("variant", ["plain", "remat", "scan", "local"])
def test_read_positions_equal_the_full_pass_gathered(tiny_params, variant):
  """hidden_states(columns=[B, N] positions), each row its own (a reward model's last tokens
  of right-padded rows): the last layer runs there only; values and gradients equal the full
  pass gathered with numpy's indexing (remat: the gather inside the rematerialised block;
  scan: gathered after; local: a sliding-window last layer whose window binds)."""
  extra = dict(remat=variant == "remat", scan_layers=variant == "scan")
  if variant == "local":
    extra.update(local_layers=(1,), sliding_window=3, rope_local_theta=10000.0)
  cfg = model_config("tiny", vocab_size=V, **extra)
  params = _stack_layers(tiny_params, cfg.n_layers) if variant == "scan" else tiny_params
  rng = np.random.RandomState(9)
  lengths = [12, 5, 9]
  mask = (np.arange(12)[None] < np.asarray(lengths)[:, None]).astype(np.int32)  # right-padded
  tokens = jnp.asarray(rng.randint(1, V, (3, 12)) * mask, jnp.int32)
  positions = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32)
  read = np.asarray([[11, 3], [4, 0], [8, 8]], np.int32)  # [B, N]: any order, repeats too
  model = Transformer(cfg)
  weights = jnp.asarray(rng.normal(size=(cfg.d_model,)), jnp.float32)

  def loss(p, gathered):
    hidden, _ = model.apply(p, tokens, positions, jnp.asarray(mask),
                            columns=jnp.asarray(read) if gathered else None,
                            method=Transformer.hidden_states)
    if not gathered:
      hidden = hidden[np.arange(3)[:, None], read]  # numpy's advanced indexing: [B, N, D]
    return jnp.sum(jnp.tanh(hidden @ weights)), hidden

  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (full, h_full), g_full = value_and_grad(params, False)
  (part, h_part), g_part = value_and_grad(params, True)
  assert h_part.shape == (3, 2, cfg.d_model)
  np.testing.assert_allclose(h_part, h_full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(part, full, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      x, y, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(y)))), g_part, g_full)


def test_read_columns_with_a_cache_fill_the_same_cache(tiny_params):
  """A prefill that reads only the last column writes every column's keys and values."""
  tokens, mask = _left_padded(np.random.RandomState(8), [9, 4], 9)
  positions = positions_from_mask(mask)
  model = Transformer(TINY)
  outs = [model.apply(tiny_params, tokens, positions, mask, init_cache(TINY, 2, 16),
                      columns=columns, method=Transformer.hidden_states)
          for columns in (None, (8, 9))]
  (h_full, cache_full), (h_last, cache_last) = outs
  np.testing.assert_allclose(h_last, h_full[:, 8:9], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
               cache_last, cache_full)


def test_scanned_layers_have_the_same_param_count(tiny_params):
  scanned = _init(model_config("tiny", vocab_size=V, scan_layers=True))
  assert _n_params(scanned) == _n_params(tiny_params) == TINY.param_count()
  assert jax.tree.map(jnp.shape, scanned) == jax.tree.map(
      jnp.shape, _stack_layers(tiny_params, TINY.n_layers))  # layers on a leading axis
  remat = _init(model_config("tiny", vocab_size=V, remat=True))
  assert jax.tree.map(jnp.shape, remat) == jax.tree.map(jnp.shape, tiny_params)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_param_count_matches_abstract_init(size):
  cfg = model_config(size, scan_layers=True)  # one traced layer: fast even for 7b
  tokens = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens, tokens, tokens)
  assert _n_params(shapes) == cfg.param_count()


def _dot_flops(jaxpr) -> int:
  """FLOPs of every dot_general in a jaxpr, nested jaxprs included (2 per multiply-add)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
      contract = math.prod(lhs[d] for d in lc)
      batch = math.prod(lhs[d] for d in lb)
      lhs_free = math.prod(lhs) // (contract * batch)
      rhs_free = math.prod(rhs) // (contract * batch)
      total += 2 * batch * contract * lhs_free * rhs_free
    for sub in jax.core.jaxprs_in_params(eqn.params):
      total += _dot_flops(sub)
  return total


def test_flops_per_token_matches_hand_and_traced_counts(tiny_params):
  cfg, params = TINY, tiny_params
  t = 16
  # Hand count for tiny (d 64, 2 layers, 4 heads of 16, 2 kv heads, d_ff 128, vocab 97), in
  # multiply-adds per token, then x2 for FLOPs:
  #   q 64*64 + k 64*32 + v 64*32 + o 64*64           = 12288
  #   gate + up + down 3 * 64*128                     = 24576
  #   scores q.k and probs.v over all t keys 2*t*4*16 = 128 t
  #   per layer 36864 + 128 t; 2 layers; lm head 64*97 = 6208
  hand = 2 * (2 * (36864 + 128 * t) + 6208)
  assert cfg.flops_per_token(t) == hand == 168_064
  assert cfg.flops_per_token(t, with_logits=False) == hand - 2 * 6208
  # The matmuls actually traced for a [1, t] forward pass (embedding lookup is a gather).
  tokens = jnp.ones((1, t), jnp.int32)
  jaxpr = jax.make_jaxpr(Transformer(cfg).apply)(params, tokens, jnp.arange(t)[None], tokens)
  assert _dot_flops(jaxpr.jaxpr) == t * hand


def test_tied_embeddings_and_qkv_bias_param_trees():
  base = model_config("tiny", vocab_size=V)
  tied = model_config("tiny", vocab_size=V, tie_embeddings=True)
  bias = model_config("tiny", vocab_size=V, qkv_bias=True)
  p_base, p_tied, p_bias = _init(base)["params"], _init(tied)["params"], _init(bias)["params"]

  assert "lm_head" in p_base and "lm_head" not in p_tied
  assert _n_params(p_base) - _n_params(p_tied) == V * base.d_model
  assert _n_params(p_tied) == tied.param_count()

  def biases(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): leaf.shape for path, leaf in flat if "bias" in
            jax.tree_util.keystr(path)}

  dh = bias.dim_per_head
  expected = {}
  for i in range(bias.n_layers):
    for name, heads in (("q", bias.n_heads), ("k", bias.n_kv_heads), ("v", bias.n_kv_heads)):
      expected[f"['layer_{i}']['attn']['{name}']['bias']"] = (heads, dh)
  assert biases(p_bias) == expected  # q, k, v only: no bias on o, the MLP or the lm head
  assert biases(p_base) == {}
  assert _n_params(p_bias) == bias.param_count()

  tokens, mask = _left_padded(np.random.RandomState(5), [6, 3], 6)
  positions = positions_from_mask(mask)
  hidden, logits, _ = _forward(tied)({"params": p_tied}, tokens, positions, mask)
  assert logits.shape == (2, 6, V) and bool(jnp.all(jnp.isfinite(logits)))
  # Tied logits are the hidden states against the embedding table itself.
  np.testing.assert_allclose(logits, hidden @ p_tied["embed"]["embedding"].T, rtol=1e-5, atol=1e-5)

  _, logits, _ = _forward(bias)({"params": p_bias}, tokens, positions, mask)
  no_bias = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if "bias" in jax.tree_util.keystr(path) else x, p_bias)
  _, logits_no_bias, _ = _forward(bias)({"params": no_bias}, tokens, positions, mask)
  assert logits.shape == (2, 6, V) and bool(jnp.all(jnp.isfinite(logits)))
  assert not np.allclose(logits, logits_no_bias, atol=1e-3)  # the biases are used


# Gemma 3's switches on a tiny model: (1 + w) and sandwich norms, q/k norms, GeGLU, scaled
# embeddings, head_dim 24 (not 64 / 4), a query scale, both soft-caps, and layers 0 and 2 local
# with a window of 4 and their own rope base. Random norm params sit near 1 here (offsets from
# 1: scales near 2), which exercises the same code.
GEMMA = model_config("tiny", vocab_size=V, n_layers=3, head_dim=24, qk_norm=True,
                     norm_plus_one=True, sandwich_norms=True, mlp_activation="gelu_tanh",
                     embed_scale=True, query_pre_attn_scalar=20.0, attn_softcap=5.0,
                     final_softcap=3.0, sliding_window=4, local_layers=(0, 2),
                     rope_local_theta=100.0)


def test_sliding_window_mask_matches_a_loop():
  """attention_mask with a window against the rule written per pair: same non-pad segment,
  k <= q, and q - k < window."""
  from rlhf_jax.models.transformer import attention_mask
  segments = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0], [1] * 12])
  q_slot = np.arange(12)
  for window in (1, 3, 5):
    got = np.asarray(attention_mask(jnp.asarray(segments), jnp.asarray(q_slot),
                                    jnp.asarray(segments), window))
    want = np.zeros_like(got)
    for b, q, k in np.ndindex(*got.shape):
      want[b, q, k] = (segments[b, q] == segments[b, k] != 0 and k <= q and q - k < window)
    np.testing.assert_array_equal(got, want)


def test_gemma_style_param_tree_and_initial_norms():
  params = _init(GEMMA)["params"]
  assert _n_params(params) == GEMMA.param_count()
  layer = params["layer_0"]
  assert set(layer) == {"attn", "attn_norm", "attn_post_norm", "mlp", "mlp_norm", "mlp_post_norm"}
  assert layer["attn"]["q_norm"]["scale"].shape == (24,) == layer["attn"]["k_norm"]["scale"].shape
  # Initialised by the model itself, a (1 + w) norm starts at w = 0: the identity scale.
  tokens = jnp.ones((1, 4), jnp.int32)
  real = jax.jit(Transformer(GEMMA).init)(jax.random.key(0), tokens, tokens, tokens)["params"]
  for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(real))[0]:
    if "scale" in jax.tree_util.keystr(path):
      assert not np.asarray(leaf).any(), path


def test_sliding_window_bounds_what_every_layer_sees():
  """All three layers local (window 4): each layer reaches 3 slots further back, so the logits
  at positions 10 and later do not depend on token 0, and position 9's do."""
  cfg = dataclasses.replace(GEMMA, local_layers=(0, 1, 2))
  params = _init(cfg)
  tokens = np.random.RandomState(10).randint(1, V, size=(1, 14))
  other = tokens.copy()
  other[0, 0] = (tokens[0, 0] % (V - 1)) + 1
  ones = jnp.ones((1, 14), jnp.int32)
  _, a, _ = _forward(cfg)(params, jnp.asarray(tokens), jnp.arange(14)[None], ones)
  _, b, _ = _forward(cfg)(params, jnp.asarray(other), jnp.arange(14)[None], ones)
  np.testing.assert_array_equal(np.asarray(a)[0, 10:], np.asarray(b)[0, 10:])
  assert not np.allclose(np.asarray(a)[0, 9], np.asarray(b)[0, 9], atol=1e-4)


def test_gemma_style_cache_decoding_past_the_window_matches_full_forward():
  """Left-padded rows decoded one token at a time from a cache that keeps every slot (the
  window lives in the mask), unscanned, scanned and rematerialised, equal the full pass."""
  params = _init(GEMMA)
  width, split = 14, 5
  tokens, mask = _left_padded(np.random.RandomState(11), [14, 11, 6], width)
  positions = positions_from_mask(mask)
  _, full, _ = _forward(GEMMA)(params, tokens, positions, mask)
  real = np.asarray(mask, bool)
  for kind in ("plain", "scan", "remat"):
    cfg = dataclasses.replace(GEMMA, scan_layers=kind == "scan", remat=kind == "remat")
    p = _stack_layers(params, cfg.n_layers) if kind == "scan" else params
    forward = _forward(cfg)
    _, whole, _ = forward(p, tokens, positions, mask)
    np.testing.assert_allclose(np.asarray(whole)[real], np.asarray(full)[real], rtol=1e-5,
                               atol=1e-5)
    cache = init_cache(cfg, tokens.shape[0], width + 2)
    _, logits, cache = forward(p, tokens[:, :split], positions[:, :split], mask[:, :split], cache)
    pieces = [logits]
    for t in range(split, width):
      _, logits, cache = forward(p, tokens[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1],
                                 cache)
      pieces.append(logits)
    cached = np.asarray(jnp.concatenate(pieces, axis=1))
    np.testing.assert_allclose(cached[real], np.asarray(full)[real], rtol=1e-5, atol=1e-5)


def test_soft_caps_bound_scores_and_logits():
  """final_softcap: every logit within (-cap, cap), and equal to cap * tanh(uncapped / cap)."""
  params = _init(GEMMA)
  tokens, mask = _left_padded(np.random.RandomState(12), [8], 8)
  positions = positions_from_mask(mask)
  _, capped, _ = _forward(GEMMA)(params, tokens, positions, mask)
  _, plain, _ = _forward(dataclasses.replace(GEMMA, final_softcap=0.0))(params, tokens, positions,
                                                                        mask)
  assert float(jnp.max(jnp.abs(plain))) > GEMMA.final_softcap  # the cap binds
  assert float(jnp.max(jnp.abs(capped))) < GEMMA.final_softcap
  cap = GEMMA.final_softcap
  np.testing.assert_allclose(capped, cap * np.tanh(np.asarray(plain) / cap), rtol=1e-5, atol=1e-5)
  _, uncapped_attn, _ = _forward(dataclasses.replace(GEMMA, attn_softcap=0.0))(
      params, tokens, positions, mask)
  assert not np.allclose(uncapped_attn, capped, atol=1e-3)  # attention's cap changes the result
