"""dot.dense: float32 is a plain matmul; bfloat16 rounds the operands and accumulates in float32,
in the forward pass and in both backward matmuls (the weight gradient through its permuted
token order included). References are float64 numpy products."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rlhf_jax.models.dot import dense


def _bf16(a):
  """The bf16 rounding of a float32 array, back in float64: what the kernels multiply."""
  return np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64)


def _grads(dtype, x, w, g):
  def f(x, w):
    return jnp.sum(dense(x, w, dtype, out_dtype=jnp.float32) * g)
  return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)


# 1280 tokens: blocks of 16; 1282: blocks of 2; 37: no block (the plain transposed contraction).
@pytest.mark.parametrize("m", [1280, 1282, 37])
def test_float32_is_the_exact_matmul(m):
  rng = np.random.default_rng(m)
  x, w, g = (rng.standard_normal(s).astype(np.float32) for s in [(m, 48), (48, 80), (m, 80)])
  y = jax.jit(lambda x, w: dense(x, w, jnp.float32))(x, w)
  dx, dw = _grads(jnp.float32, x, w, g)
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, x64.T @ g64, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("m", [1280, 1282, 37])
def test_bfloat16_rounds_operands_and_accumulates_in_float32(m):
  rng = np.random.default_rng(m)
  x, w, g = (rng.standard_normal(s).astype(np.float32) for s in [(m, 48), (48, 80), (m, 80)])
  y32 = jax.jit(lambda x, w: dense(x, w, jnp.bfloat16, out_dtype=jnp.float32))(x, w)
  y16 = jax.jit(lambda x, w: dense(x, w, jnp.bfloat16))(x, w)
  dx, dw = _grads(jnp.bfloat16, x, w, g)
  assert y16.dtype == jnp.bfloat16 and dx.dtype == dw.dtype == jnp.float32
  xb, wb, gb = _bf16(x), _bf16(w), _bf16(g)
  # float32 accumulation of bf16 products: ~1e-6 relative. A bf16 accumulator (or bf16
  # output of a backward matmul) would be off by ~1e-2, and float32 operands by ~1e-3.
  scale = lambda a: np.abs(a).max()  # noqa: E731
  assert np.abs(np.asarray(y32) - xb @ wb).max() <= 1e-5 * scale(xb @ wb)
  assert np.abs(np.asarray(dx) - gb @ wb.T).max() <= 1e-5 * scale(gb @ wb.T)
  assert np.abs(np.asarray(dw) - xb.T @ gb).max() <= 1e-5 * scale(xb.T @ gb)
  # The bf16 result is the float32 one rounded once.
  np.testing.assert_array_equal(np.asarray(y16), np.asarray(y32).astype(ml_dtypes.bfloat16))
  # And it really is rounded: the float32 product differs by more than accumulation error.
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  assert np.abs(np.asarray(y32) - x64 @ w64).max() > 1e-4 * scale(x64 @ w64)


def test_bfloat16_gradients_keep_the_input_dtypes():
  """Activations in bf16 get bf16 gradients; float32 params get float32 gradients."""
  x = jnp.ones((32, 8), jnp.bfloat16)
  w = jnp.ones((8, 4), jnp.float32)
  dx, dw = jax.grad(lambda x, w: jnp.sum(dense(x, w, jnp.bfloat16).astype(jnp.float32)),
                    argnums=(0, 1))(x, w)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.full((32, 8), 4.0))
  np.testing.assert_array_equal(np.asarray(dw), np.full((8, 4), 32.0))


def test_bfloat16_backward_under_scan_keeps_no_copy_of_the_kernels():
  """The backward of a scanned stack reads each layer's kernel from the stacked params: the
  compiled temporaries stay below the bytes of one bf16 copy of the kernels, which is what a
  residual of the cast kernel costs (the stack's [L, K, K] kernels cast and kept per layer;
  3.3x that bound before the VJP kept the kernel itself; 0.41x after)."""
  layers, k, m = 8, 512, 32

  def loss(kernels, biases, x):  # the kernels frozen, as LoRA's base; gradient: the biases
    def layer(h, weights):
      kernel, bias = weights
      return jnp.tanh(dense(h, kernel, jnp.bfloat16, jnp.float32) + bias), None
    h, _ = jax.lax.scan(layer, x, (kernels, biases))
    return jnp.sum(h)

  kernels = jax.ShapeDtypeStruct((layers, k, k), jnp.float32)
  x = jax.ShapeDtypeStruct((m, k), jnp.float32)
  biases = jax.ShapeDtypeStruct((layers, k), jnp.float32)
  compiled = jax.jit(jax.grad(loss, argnums=1)).lower(kernels, biases, x).compile()
  bf16_kernels = layers * k * k * 2
  assert compiled.memory_analysis().temp_size_in_bytes < bf16_kernels
