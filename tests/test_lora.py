"""LoRA at the model level: a fresh adapter is the identity, its gradients follow the chain rule
from the full weight's gradient, and folding it into the kernels gives the same function."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import randomize_lora_b

from rlhf_jax.models import ModelConfig, Transformer, lora

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                   max_len=32)


def _inputs(b=2, t=12, vocab=64, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  return tokens, positions, jnp.ones((b, t), jnp.int32)


def _init(config, seed=0):
  tokens, positions, segments = _inputs()
  init = jax.jit(Transformer(config).init)
  return nn.unbox(init(jax.random.key(seed), tokens, positions, segments)["params"])


def _logits(config, params, inputs):
  """Jitted: op-by-op, a forward (and its gradient) costs a compile per operation."""
  return jax.jit(lambda p, *xs: Transformer(config).apply({"params": p}, *xs)[0])(params, *inputs)


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_adapters_leave_the_logits_exactly_unchanged(scan):
  config = dataclasses.replace(BASE, lora_rank=4, scan_layers=scan)
  params = _init(config)
  # Seven projections per layer (q, k, v, o, gate, up, down), two arrays each.
  per_layer = 7 * 2
  assert lora.count_adapters(params) == (per_layer if scan else per_layer * BASE.n_layers)
  base = lora.strip(params)
  inputs = _inputs()
  np.testing.assert_array_equal(_logits(config, params, inputs),
                                _logits(lora.base_config(config), base, inputs))


def test_target_pattern_selects_projections_by_path():
  config = dataclasses.replace(BASE, lora_rank=2, lora_targets=r"attn/(q|v)$")
  params = _init(config)
  adapted = sorted("/".join(str(k.key) for k in p[:-1])
                   for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                   if str(p[-1].key) == "lora_a")
  assert adapted == ["layer_0/attn/q", "layer_0/attn/v", "layer_1/attn/q", "layer_1/attn/v"]


@pytest.mark.parametrize("scan", [False, True])
def test_fold_gives_the_unmerged_models_logits(scan):
  config = dataclasses.replace(BASE, lora_rank=4, lora_alpha=8.0, scan_layers=scan)
  params = randomize_lora_b(_init(config))
  inputs = _inputs()
  unmerged = _logits(config, params, inputs)
  folded = lora.fold(params, config)
  assert lora.count_adapters(folded) == 0
  merged = _logits(lora.base_config(config), folded, inputs)
  assert float(jnp.max(jnp.abs(unmerged - merged))) <= 1e-5 * float(jnp.max(jnp.abs(unmerged)))
  # ... and the adapters did change the function (the comparison above can fail).
  base = _logits(lora.base_config(config), lora.strip(params), inputs)
  assert float(jnp.max(jnp.abs(unmerged - base))) > 1e-3


def test_adapter_gradients_follow_the_chain_rule_from_the_full_weight():
  """y = x (W + s A B): dL/dA = s dW B^T and dL/dB = s A^T dW, where dW is the gradient of the
  same loss with respect to the merged weight W + s A B (a dense reference model)."""
  config = dataclasses.replace(BASE, lora_rank=3, lora_alpha=6.0)
  s = config.lora_alpha / config.lora_rank
  params = randomize_lora_b(_init(config))
  inputs = _inputs()
  target = jax.random.normal(jax.random.key(7), (2, 12, BASE.vocab_size))

  def loss(logits):
    return jnp.sum(jnp.tanh(logits) * target)

  trainable, frozen = lora.split(params)
  g_lora = jax.jit(jax.grad(lambda tr: loss(_logits(config, lora.merge(tr, frozen), inputs))))(
      trainable)
  merged = lora.fold(params, config)
  g_full = jax.jit(jax.grad(lambda p: loss(_logits(lora.base_config(config), p, inputs))))(merged)
  for layer in ("layer_0", "layer_1"):
    for module, kernel, prefix in (("mlp/up", "kernel", ""), ("attn/q", "kernel", ""),
                                   ("attn", "o", "o_")):
      node = params[layer]
      g_node, gw_node = g_lora[layer], g_full[layer]
      for part in module.split("/"):
        node, g_node, gw_node = node[part], g_node[part], gw_node[part]
      a, b = node[prefix + "lora_a"], node[prefix + "lora_b"]
      r = a.shape[-1]
      a2, b2 = a.reshape(-1, r), b.reshape(r, -1)
      gw = gw_node[kernel].reshape(a2.shape[0], b2.shape[1])
      want_a = s * gw @ b2.T
      want_b = s * a2.T @ gw
      got_a = g_node[prefix + "lora_a"].reshape(want_a.shape)
      got_b = g_node[prefix + "lora_b"].reshape(want_b.shape)
      for got, want in ((got_a, want_a), (got_b, want_b)):
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0
        assert float(jnp.max(jnp.abs(got - want))) <= 1e-4 * scale, (layer, module)


def test_split_merge_round_trip_and_what_is_trainable():
  config = dataclasses.replace(BASE, lora_rank=2)
  params = {"trunk": _init(config), "head": {"dense": {"kernel": jnp.ones((32, 1)),
                                                      "bias": jnp.zeros((1,))}}}
  trainable, frozen = lora.split(params)
  assert set(trainable) == {"trunk", "head"}
  assert lora.count_adapters(frozen) == 0
  assert lora.count_adapters(trainable) == lora.count_adapters(params)
  back = lora.merge(trainable, frozen)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert x is y


def test_bf16_adapter_matches_float32_within_bf16_precision():
  config = dataclasses.replace(BASE, lora_rank=4)
  params = randomize_lora_b(_init(config))
  inputs = _inputs()
  f32 = _logits(config, params, inputs)
  bf16 = _logits(dataclasses.replace(config, dtype="bfloat16"), params, inputs)
  err = float(jnp.max(jnp.abs(f32 - bf16.astype(jnp.float32))))
  assert err <= 0.05 * float(jnp.max(jnp.abs(f32)))


def test_fingerprint_names_a_changed_base():
  params = _init(BASE)
  same = jax.tree.map(lambda x: x + 0, params)
  assert lora.fingerprint(params) == lora.fingerprint(same)
  changed = jax.tree.map(lambda x: x, params)
  up = params["layer_0"]["mlp"]["up"]["kernel"]
  changed["layer_0"]["mlp"]["up"]["kernel"] = up.at[0, 0].add(1e-3)
  assert lora.fingerprint(params) != lora.fingerprint(changed)


def test_bad_lora_settings_are_errors():
  with pytest.raises(ValueError, match="lora_rank"):
    dataclasses.replace(BASE, lora_rank=-1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_no_weight_gradient_of_the_base_is_computed(dtype):
  """The compiled backward pass of a LoRA step has no matmul producing a base kernel's
  gradient ([D, F]-shaped outputs), while the full-parameter one has them (the check can
  fail). bfloat16 goes through dense's custom VJP, whose unused weight gradient XLA drops."""
  import re
  config = dataclasses.replace(BASE, lora_rank=4, dtype=dtype)
  params = _init(config)
  inputs = _inputs()  # 2 x 12 = 24 token rows: no activation is [32, *] or [48, *]
  trainable, frozen = lora.split(params)
  kernel_shapes = ("32,32", "32,16", "32,48", "48,32")
  pattern = re.compile(r"= f32\[(%s)\]\{[^}]*\} (dot|convolution)\(" % "|".join(kernel_shapes))

  def loss(p):
    return jnp.sum(_logits(config, p, inputs) ** 2)

  lora_hlo = jax.jit(jax.grad(lambda tr: loss(lora.merge(tr, frozen)))).lower(
      trainable).compile().as_text()
  full_hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  assert pattern.search(full_hlo), "the full-parameter gradient should compute kernel grads"
  assert not pattern.search(lora_hlo), pattern.search(lora_hlo).group(0)


def test_token_rows_act_as_those_rows_of_the_embedding(scan=True):
  """Trained token rows (lora_tokens) are E[ids] + rows in the lookup and in the tied
  projection: the adapted model's logits equal a plain model's whose embedding rows were
  replaced in numpy, and `fold` writes the same table. Zeroed adapters give the base back,
  and the chunked log-probs and their gradient with respect to the rows match the unchunked."""
  from rlhf_jax.models import chunked
  ids = (3, 7, 60)
  config = dataclasses.replace(BASE, lora_rank=2, lora_tokens=ids, tie_embeddings=True,
                               scan_layers=scan)
  params = randomize_lora_b(_init(config))
  rows = np.asarray(params["token_rows_lora_b"])  # [3, D], drawn N(0, 0.05) like every lora_b
  assert rows.shape == (3, BASE.d_model) and np.abs(rows).min() > 0
  assert lora.is_trainable(("token_rows_lora_b",))
  inputs = _inputs()
  inputs = (inputs[0].at[0, :3].set(jnp.asarray(ids)),) + inputs[1:]  # every id is read
  table = np.asarray(params["embed"]["embedding"]).copy()
  table[list(ids)] += rows
  folded = lora.fold(params, config)
  np.testing.assert_allclose(np.asarray(folded["embed"]["embedding"]), table, rtol=1e-6)
  # The reference: lora.fold's kernels for the adapters (tested above), the rows added in
  # numpy, run as a model without LoRA.
  reference = dict(folded, embed={"embedding": jnp.asarray(table)})
  got = _logits(config, params, inputs)
  want = _logits(lora.base_config(config), reference, inputs)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
  np.testing.assert_array_equal(
      _logits(config, lora.zero_adapters(params), inputs),
      _logits(lora.base_config(config), lora.strip(params), inputs))

  def logp(p, chunk):
    c = dataclasses.replace(config, vocab_chunk=chunk)
    hidden = Transformer(c).apply({"params": p}, *inputs, method=Transformer.hidden_states)[0]
    return chunked.model_logit_stats(p, hidden[:, :-1], inputs[0][:, 1:],
                                     model_config=c)[0].sum()

  grads = {}
  for chunk in (0, 24):  # 24 does not divide the 64-word vocabulary
    value, grad = jax.jit(jax.value_and_grad(lambda r: logp(
        dict(params, token_rows_lora_b=r), chunk)))(params["token_rows_lora_b"])
    grads[chunk] = (float(value), np.asarray(grad))
  np.testing.assert_allclose(grads[24][0], grads[0][0], rtol=1e-5)
  np.testing.assert_allclose(grads[24][1], grads[0][1], rtol=1e-4,
                             atol=1e-5 * float(np.abs(grads[0][1]).max()))
  assert np.abs(grads[0][1]).min() > 0  # each row is read as input and as output


def test_token_rows_need_tied_distinct_ids():
  with pytest.raises(ValueError, match="lora_tokens"):
    dataclasses.replace(BASE, lora_rank=2, lora_tokens=(3, 3), tie_embeddings=True)
  with pytest.raises(ValueError, match="lora_tokens"):
    dataclasses.replace(BASE, lora_rank=2, lora_tokens=(3,), tie_embeddings=False)
  with pytest.raises(ValueError, match="lora_tokens"):
    dataclasses.replace(BASE, lora_rank=2, lora_tokens=(64,), tie_embeddings=True)


def test_tokens_start_copies_a_base_row_into_a_token_row():
  """lora.tokens_start '60:1' makes the folded embedding's row 60 equal the base's row 1 (the
  pipeline starts Gemma base's untrained <end_of_turn> from <eos>); the other rows, and rows
  under a nested prefix (an RM's trunk), follow the same rule; bad specs are errors."""
  ids = (3, 7, 60)
  config = dataclasses.replace(BASE, lora_rank=2, lora_tokens=ids, tie_embeddings=True)
  trainable, frozen = lora.split(_init(config))
  table = np.asarray(frozen["embed"]["embedding"])  # [V, D]
  starts = lora.parse_token_starts("60:1, 3:3", ids)
  assert starts == ((2, 1), (0, 3))
  for prefix in ((), ("trunk",)):
    wrap = lambda t: {prefix[0]: t} if prefix else t  # noqa: E731
    out = lora.start_token_rows(wrap(trainable), wrap(frozen), config, starts)
    out = out[prefix[0]] if prefix else out
    folded = np.asarray(lora.fold(lora.merge(out, frozen), config)["embed"]["embedding"])
    np.testing.assert_allclose(folded[60], table[1], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(folded[[3, 7]], table[[3, 7]])  # 3 from itself, 7 untouched
    np.testing.assert_array_equal(folded[:3], table[:3])
  for bad, match in (("5:1", "not one of"), ("60-1", "row_id:source_id"), ("60:64", "outside")):
    with pytest.raises(ValueError, match=match):
      lora.start_token_rows(trainable, frozen, config, lora.parse_token_starts(bad, ids))
