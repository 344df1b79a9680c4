"""Chunked vocabulary reductions (rlhf_jax/models/chunked.py) against the unchunked ones.

References: float64 numpy log-softmax of the full logits (independent of JAX), the unchunked
`losses` functions for gradients (jax.grad of the [B, T, V] route), and the compiled temp size
of both routes for a large vocabulary. Also core/compiled_memory.py against hand counts.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.core.compiled_memory import compiled_memory
from rlhf_jax.models import chunked, losses
from rlhf_jax.models.dot import dense
from rlhf_jax.models.sizes import model_config
from rlhf_jax.models.transformer import Transformer

B, T, D, V = 2, 6, 16, 101  # 101 is prime: no chunk size below it divides it


def _inputs(seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  hidden = rng.standard_normal((B, T, D)).astype(np.float32)
  kernel = (scale * rng.standard_normal((D, V)) / np.sqrt(D)).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  targets[0, 0], targets[1, 0] = 0, V - 1  # the first and last vocabulary columns
  mask = (rng.random((B, T)) < 0.6).astype(np.float32)
  return hidden, kernel, targets, mask


def _reference(hidden, kernel, targets, temperature=1.0, softcap=0.0):
  """(log p(target), entropy) [B, T] in float64 numpy from the whole logits."""
  logits = hidden.astype(np.float64) @ kernel.astype(np.float64)  # [B, T, V]
  if softcap:
    logits = np.tanh(logits / softcap) * softcap
  logits = logits / temperature
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return picked, -(np.exp(logp) * logp).sum(-1)


def _close(actual, expected, rtol):
  """Equal to rtol of the values' size (an elementwise rtol alone fails on values near 0)."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=rtol,
                             atol=rtol * float(np.max(np.abs(expected))))


# chunk 0: off (one chunk); 7, 32: the last chunk overlaps the one before; 101: exactly V;
# 500: larger than V.
@pytest.mark.parametrize("chunk", [0, 7, 32, 101, 500])
@pytest.mark.parametrize("temperature,softcap", [(1.0, 0.0), (0.7, 0.0), (1.3, 2.0)])
def test_values_match_the_whole_vocabulary(chunk, temperature, softcap):
  hidden, kernel, targets, mask = _inputs(scale=3.0)
  logp, ent = jax.jit(lambda h, k, t: chunked.logit_stats(
      h, k, t, chunk=chunk, temperature=temperature, softcap=softcap))(hidden, kernel, targets)
  ref_logp, ref_ent = _reference(hidden, kernel, targets, temperature, softcap)
  _close(logp, ref_logp, 1e-6)
  _close(ent, ref_ent, 1e-6)
  only_logp = chunked.token_logprobs(hidden, kernel, targets, chunk=chunk,
                                     temperature=temperature, softcap=softcap)
  _close(only_logp, ref_logp, 1e-6)
  _close(chunked.entropy(hidden, kernel, chunk=chunk, temperature=temperature, softcap=softcap),
         ref_ent, 1e-6)
  total, count = chunked.next_token_loss(hidden, kernel, targets, mask, chunk=chunk,
                                         softcap=softcap)
  ref_total = -np.sum(_reference(hidden, kernel, targets, 1.0, softcap)[0] * mask)
  _close(total, ref_total, 1e-6)
  assert float(count) == mask.sum()


# vocab_axis 0: the kernel stored as [V, D], as a tied embedding is.
@pytest.mark.parametrize("chunk,vocab_axis", [(7, 1), (32, 1), (7, 0)])
def test_gradients_match_the_unchunked_route(chunk, vocab_axis):
  hidden, kernel, targets, mask = _inputs(seed=1, scale=2.0)

  def chunked_loss(h, k):
    k = k.T if vocab_axis == 0 else k
    total, count = chunked.next_token_loss(h, k, targets, mask, chunk=chunk,
                                           vocab_axis=vocab_axis)
    ent = chunked.entropy(h, k, chunk=chunk, temperature=0.8, vocab_axis=vocab_axis)
    return total / count + 0.1 * jnp.mean(ent)

  def whole_loss(h, k):
    logits = h @ k  # [B, T, V]
    total, count = losses.next_token_loss(logits, targets, mask)
    return total / count + 0.1 * jnp.mean(losses.entropy_from_logits(logits / 0.8))

  got = jax.jit(jax.grad(chunked_loss, argnums=(0, 1)))(hidden, kernel)
  want = jax.jit(jax.grad(whole_loss, argnums=(0, 1)))(hidden, kernel)
  for g, w in zip(got, want):
    assert np.all(np.isfinite(g))
    _close(g, w, 1e-5)
  # Masked positions get no gradient from the loss; with the entropy term off, exactly none.
  only_loss = jax.grad(lambda h: chunked.next_token_loss(h, kernel, targets, mask,
                                                         chunk=chunk)[0])(hidden)
  assert np.all(np.asarray(only_loss)[mask == 0] == 0.0)


def test_entropy_grad_off_holds_the_entropy_out_of_autodiff():
  hidden, kernel, targets, _ = _inputs(seed=2)
  g = jax.grad(lambda h: jnp.sum(chunked.logit_stats(h, kernel, targets, chunk=7,
                                                     entropy_grad=False)[1]))(hidden)
  assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("tie", [False, True])
def test_output_projection_reproduces_the_model_projection(tie):
  cfg = model_config("tiny", vocab_size=V, tie_embeddings=tie)
  model = Transformer(cfg)
  tokens = jnp.asarray(_inputs()[2])
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  segments = jnp.ones((B, T), jnp.int32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, positions, segments)["params"]
  hidden, _ = jax.jit(lambda p: model.apply({"params": p}, tokens, positions, segments,
                                            method=Transformer.hidden_states))(params)
  logits = jax.jit(lambda p: model.apply({"params": p}, hidden, method=Transformer.project))(params)
  targets = jnp.roll(tokens, -1, axis=1)
  want = losses.token_logprobs(logits, targets)
  kernel, vocab_axis = chunked.output_projection(params, tie)
  assert kernel.shape == ((V, cfg.d_model) if tie else (cfg.d_model, V))
  got = chunked.token_logprobs(hidden, kernel, targets, chunk=16, vocab_axis=vocab_axis)
  _close(got, want, 1e-6)


def _temp_bytes(fn, *args):
  return compiled_memory(fn, *args)["temp_bytes"]


@pytest.mark.parametrize("vocab_axis", [1, 0])
def test_compiled_memory_is_far_below_the_whole_logits(vocab_axis):
  b, t, d, v, chunk = 2, 64, 64, 65536, 4096
  hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  kernel = jax.ShapeDtypeStruct((d, v), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
  mask = jax.ShapeDtypeStruct((b, t), jnp.float32)

  def whole(h, k, y, m):
    return losses.next_token_loss(h @ k, y, m)[0]

  def parts(h, k, y, m):
    return chunked.next_token_loss(h, k, y, m, chunk=chunk, vocab_axis=vocab_axis)[0]

  # vocab_axis 0: a [V, D] kernel (a tied embedding), sliced as stored; a whole transposed
  # copy (16 MiB) would fail the bounds below.
  stored = jax.ShapeDtypeStruct((v, d), jnp.float32) if vocab_axis == 0 else kernel

  logits_bytes = b * t * v * 4  # 32 MiB: one float32 copy of the logits
  for fn in (lambda *a: jax.grad(whole, argnums=(0, 1))(*a), whole):
    assert _temp_bytes(fn, hidden, kernel, targets, mask) >= logits_bytes
  # Chunked, forward and backward hold a few [B*T, chunk] blocks (measured ~4 and ~5 MiB):
  # the backward recomputes one chunk's logits at a time (jax.checkpoint), and the kernel's
  # gradient [D, V] is the step's output, not a temporary.
  fwd = _temp_bytes(parts, hidden, stored, targets, mask)
  bwd = _temp_bytes(lambda *a: jax.grad(parts, argnums=(0, 1))(*a), hidden, stored, targets, mask)
  assert fwd < logits_bytes / 4, fwd
  assert bwd < logits_bytes / 4, bwd


# ---------------------------------------------------------------------------------------------
# compiled_memory: XLA's plan against hand counts.


def test_compiled_memory_of_an_addition_is_its_arrays():
  n = 10_000
  x = jax.ShapeDtypeStruct((n,), jnp.float32)
  got = compiled_memory(lambda a, b: a + b, x, x)
  assert got["argument_bytes"] == 2 * n * 4  # two float32 inputs
  assert got["output_bytes"] == n * 4  # one float32 output, no donation
  assert got["alias_bytes"] == 0
  assert got["temp_bytes"] < n * 4  # the sum is written straight into the output
  assert got["peak_bytes"] == 3 * n * 4 + got["temp_bytes"]
  assert got["generated_code_bytes"] >= 0
  donated = compiled_memory(jax.jit(lambda a, b: a + b, donate_argnums=0), x, x)
  assert donated["alias_bytes"] == n * 4  # the output reuses a's buffer
  assert donated["peak_bytes"] == 2 * n * 4 + donated["temp_bytes"]


def test_compiled_memory_of_a_tiny_model_counts_params_inputs_and_logits():
  cfg = model_config("tiny", vocab_size=V)
  model = Transformer(cfg)
  tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
  params = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((B, T), jnp.int32), jnp.zeros((B, T), jnp.int32),
      jnp.ones((B, T), jnp.int32))["params"]))

  def forward(p, tok, pos, seg):
    return model.apply({"params": p}, tok, pos, seg)[0]

  got = compiled_memory(forward, params, tokens, tokens, tokens)
  # float32 params (ModelConfig.param_count, from the shapes) and three int32 [B, T] inputs.
  assert got["argument_bytes"] == cfg.param_count() * 4 + 3 * B * T * 4
  assert got["output_bytes"] == B * T * V * 4  # float32 logits
  assert got["temp_bytes"] > 0  # activations


# ---------------------------------------------------------------------------------------------
# The trainers' entry points: chunk 0 is the old route bit for bit, chunk > 0 agrees with it.


def _tiny_model(tie=False, softcap=0.0):
  cfg = model_config("tiny", vocab_size=V, tie_embeddings=tie, final_softcap=softcap)
  model = Transformer(cfg)
  tokens = jnp.asarray(_inputs()[2])
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  segments = jnp.ones((B, T), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), tokens, positions,
                                        segments)["params"])
  return cfg, model, params, (tokens, positions, segments)


@pytest.mark.parametrize("tie,softcap", [(False, 0.0), (True, 5.0)])
def test_model_functions_keep_the_old_route_at_chunk_zero(tie, softcap):
  cfg, model, params, (tokens, positions, segments) = _tiny_model(tie, softcap)
  targets = jnp.roll(tokens, -1, axis=1)
  mask = jnp.asarray(_inputs()[3])
  logits, _ = model.apply({"params": params}, tokens, positions, segments)  # [B, T, V]
  hidden, _ = model.apply({"params": params}, tokens, positions, segments,
                          method=Transformer.hidden_states)
  old_loss = losses.next_token_loss(logits, targets, mask)
  old_logp = losses.token_logprobs(logits / 0.7, targets)
  old_ent = losses.entropy_from_logits(logits / 0.7)
  loss0 = chunked.model_next_token_loss(params, hidden, targets, mask, model_config=cfg)
  logp0, ent0 = chunked.model_logit_stats(params, hidden, targets, model_config=cfg,
                                          temperature=0.7, with_entropy=True)
  for got, want in zip((*loss0, logp0, ent0), (*old_loss, old_logp, old_ent)):
    np.testing.assert_array_equal(got, want)
  loss7 = chunked.model_next_token_loss(params, hidden, targets, mask, model_config=cfg, chunk=7)
  logp7, ent7 = chunked.model_logit_stats(params, hidden, targets, model_config=cfg,
                                          temperature=0.7, chunk=7, with_entropy=True)
  for got, want in zip((*loss7, logp7, ent7), (*old_loss, old_logp, old_ent)):
    _close(got, want, 1e-6)
  assert chunked.model_logit_stats(params, hidden, targets, model_config=cfg)[1] is None


def test_sequence_logprobs_in_chunks_match_the_whole_vocabulary():
  from rlhf_jax.infer.logprobs import sequence_logprobs
  cfg, _, params, (tokens, positions, segments) = _tiny_model()
  answer_mask = jnp.asarray(_inputs()[3][:, :4])  # the last 4 columns are the answer
  args = (params, tokens, positions, segments, answer_mask)
  whole = sequence_logprobs(*args, model_config=cfg)
  np.testing.assert_array_equal(whole, sequence_logprobs(*args, model_config=cfg, vocab_chunk=0))
  _close(sequence_logprobs(*args, model_config=cfg, vocab_chunk=16), whole, 1e-6)


def test_bfloat16_compute_matches_the_mixed_precision_projection():
  """In bf16 the chunks multiply with `dot.dense`'s mixed form, as lm_head does: the same
  rounded operands, float32 accumulation, so values and gradients match the whole route."""
  hidden, kernel, targets, _ = _inputs(seed=3)

  def whole(h, k):
    logits = dense(h.reshape(-1, D), k, jnp.bfloat16, out_dtype=jnp.float32)  # [B*T, V]
    return jnp.sum(losses.token_logprobs(logits.reshape(B, T, V), targets))

  def parts(h, k):
    return jnp.sum(chunked.token_logprobs(h, k, targets, chunk=7, dtype=jnp.bfloat16))

  _close(parts(hidden, kernel), whole(hidden, kernel), 1e-6)
  for g, w in zip(jax.grad(parts, argnums=(0, 1))(hidden, kernel),
                  jax.grad(whole, argnums=(0, 1))(hidden, kernel)):
    _close(g, w, 1e-5)


# ------------------------------------------------------------------- wired into SFT and PPO


def _close_trees(a, b, rel=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert np.max(np.abs(x - y)) <= rel * max(np.max(np.abs(y)), 1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_sft_loss_and_gradients_with_vocab_chunks_equal_the_whole_vocabulary(tied):
  """train/lm.lm_loss with ModelConfig.vocab_chunk = 48 (not a divisor of the 128 words)
  against vocab_chunk = 0 (the whole logits): summed loss, count and every gradient."""
  import dataclasses
  from rlhf_jax.train import lm
  whole = dataclasses.replace(model_config("tiny", vocab_size=128), tie_embeddings=tied)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 128, (4, 17))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(16), (4, 16)),
           "segment_ids": np.ones((4, 16), np.int32),
           "loss_mask": (rng.random((4, 16)) > 0.3).astype(np.float32)}
  params = nn.unbox(jax.jit(Transformer(whole).init)(
      jax.random.key(0), batch["inputs"], batch["positions"], batch["segment_ids"])["params"])
  out = {}
  for chunk in (0, 48):
    model = Transformer(dataclasses.replace(whole, vocab_chunk=chunk))
    (loss, (count, _)), grads = jax.jit(jax.value_and_grad(lambda p: lm.lm_loss(p, batch, model),
                                                      has_aux=True))(params)
    out[chunk] = (loss, count, grads)
  assert float(out[0][1]) == float(out[48][1])
  np.testing.assert_allclose(float(out[48][0]), float(out[0][0]), rtol=1e-6)
  _close_trees(out[48][2], out[0][2])


def test_loss_columns_put_each_rows_loss_positions_first_in_order():
  """chunked.loss_columns against a Python loop over the rows."""
  mask = (np.random.default_rng(3).random((5, 23)) < 0.4).astype(np.float32)
  got = np.asarray(chunked.loss_columns(jnp.asarray(mask), 16))
  for row, cols in zip(mask, got):
    inside = [t for t in range(len(row)) if row[t] > 0]
    outside = [t for t in range(len(row)) if row[t] <= 0]
    assert cols.tolist() == (inside + outside)[:16]


def test_loss_capacity_rounds_the_share_up_to_eight_columns():
  # 2 rows x 16 = 32 positions: a share of 0.3 is 9.6 -> 10 -> 16; 0.8 is 25.6 -> 26 -> 32,
  # the whole group, so nothing is gathered (0); a share of 0 is off.
  assert chunked.loss_capacity(2, 16, 0.3) == 16
  assert chunked.loss_capacity(2, 16, 0.8) == 0
  assert chunked.loss_capacity(2, 16, 0.0) == 0
  assert chunked.loss_capacity(4, 128, 0.5) == 256


@pytest.mark.parametrize("chunk", [0, 48])
@pytest.mark.parametrize("share,groups", [(0.5, 1), (0.5, 2), (0.25, 1)])
def test_sft_loss_on_gathered_loss_positions_equals_every_position(chunk, share, groups):
  """lm_loss with data.loss_capacity (the output projection on the gathered loss positions)
  against every position: summed loss, count and every gradient, and which route ran. 0.5 of
  4 x 16 positions is 32 columns: the 25 loss positions fit, in one group, or in two groups of
  2 rows (16 columns each for 14 and 11); at 0.25 (16 columns) they do not, and the step takes
  the every-position route, equal too."""
  import dataclasses
  from rlhf_jax.train import lm
  config = dataclasses.replace(model_config("tiny", vocab_size=128), vocab_chunk=chunk)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 128, (4, 17))
  mask = np.zeros((4, 16), np.float32)
  for row, (start, stop) in enumerate([(2, 9), (10, 16), (0, 7), (9, 14)]):
    mask[row, start:stop] = 1.0  # an assistant turn per row: 7 + 6 + 7 + 5 = 25 positions
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(16), (4, 16)),
           "segment_ids": np.ones((4, 16), np.int32), "loss_mask": mask}
  model = Transformer(config)
  params = nn.unbox(jax.jit(model.init)(
      jax.random.key(0), batch["inputs"], batch["positions"], batch["segment_ids"])["params"])
  out = {}
  for name, kwargs in (("every", {}), ("gathered", dict(loss_share=share, groups=groups))):
    loss_fn = lambda p, kw=kwargs: lm.lm_loss(p, batch, model, **kw)  # noqa: E731
    (loss, (count, gathered)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params)
    out[name] = (loss, count, grads, float(gathered))
  assert out["every"][3] == 0.0
  assert out["gathered"][3] == (1.0 if share == 0.5 else 0.0)
  assert float(out["gathered"][1]) == float(out["every"][1]) == 25.0
  np.testing.assert_allclose(float(out["gathered"][0]), float(out["every"][0]), rtol=1e-6)
  _close_trees(out["gathered"][2], out["every"][2])


@pytest.mark.heavy  # 27 s cold; the log-prob, entropy and loss equalities above stay in make test
def test_ppo_loss_and_gradients_with_vocab_chunks_equal_the_whole_vocabulary():
  """rl/ppo.ppo_loss (log-probs, entropy with its gradient, the ptx term) at vocab_chunk 40
  against 0 on one random minibatch."""
  import dataclasses
  import ppo_setup as S
  from rlhf_jax.rl import ppo
  hyper = ppo.PPOHyper(temperature=0.7, ent_coef=0.01, ptx_coef=0.5)
  params = {"policy": S.policy_params(0), "critic": S.scalar_params(1)}
  exp, ptx = S.minibatch_with_ptx(params["policy"])
  out = {}
  for chunk in (0, 40):
    cfg = dataclasses.replace(S.CFG, vocab_chunk=chunk)
    models = ppo.PPOModels(policy=cfg, critic=S.CFG, reward=S.CFG)
    (loss, stats), grads = jax.jit(jax.value_and_grad(
        lambda p: ppo.ppo_loss(p, exp, ptx, models=models, hyper=hyper), has_aux=True))(params)
    out[chunk] = (loss, stats, grads)
  np.testing.assert_allclose(float(out[40][0]), float(out[0][0]), rtol=1e-5)
  for key in ("ppo/policy/entropy", "ppo/loss/ptx", "ppo/loss/policy"):
    np.testing.assert_allclose(float(out[40][1][key]), float(out[0][1][key]), rtol=1e-5)
  _close_trees(out[40][2], out[0][2], rel=1e-4)
