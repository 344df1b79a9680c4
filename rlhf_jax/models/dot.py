"""`dense`: the one matmul of every projection, in float32 or in mixed precision.

With a float32 compute dtype it is a plain dot. With a narrower one (bfloat16), the operands
are cast to it and the products accumulate in float32 (`preferred_element_type`), in the
forward pass and in both matmuls of the backward pass; the result is then cast to the compute
dtype. That is what bf16 hardware does natively (TPU MXU, tensor cores, AVX512-BF16), and it is
also the only bf16 form that is fast on a CPU: XLA's CPU backend runs a bf16 matmul with bf16
output as a float32 matmul wrapped in converts (slower than float32), while bf16 inputs with a
float32 result go to its bf16 kernels at about twice the float32 rate (benchmarks/RESULTS.md).

Why a custom VJP: autodiff of a dot with `preferred_element_type` gives backward matmuls whose
output is bf16 again (the slow form), and the weight gradient x^T·g contracts the token axis,
the major axis of both operands. XLA:CPU's bf16 kernels take only a contraction over the
lhs's minor axis, so it turns that matmul back into a float32 one; and an explicit x.T is
folded back into the dot by XLA's simplifier. Here the weight gradient is an ordinary
[K, M]·[M, F] product whose x^T is made through a 3-D reshape and transpose that the
simplifier leaves alone: 1.2-2.8x the autodiff form's weight gradient at W1's shapes, and a
whole projection step 1.5-1.9x (benchmarks/matmul_forms.py; figures in RESULTS.md there).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

_NN = (((1,), (0,)), ((), ()))  # [M, K] . [K, F]
_NT = (((1,), (1,)), ((), ()))  # [M, F] . [K, F]^T
_TN = (((0,), (0,)), ((), ()))  # [M, K]^T . [M, F]


def dense(x: Array, kernel: Array, dtype, out_dtype=None) -> Array:
  """x [M, K] @ kernel [K, F] -> [M, F] in `out_dtype` (default `dtype`).

  dtype: the compute dtype of the operands. float32: a plain dot. Anything narrower: operands
  in `dtype`, accumulation and both backward matmuls in float32-accumulating `dtype` matmuls.
  """
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if dtype == jnp.float32:
    # XLA's own layout choices for float32 gradients beat the custom VJP's (measured on CPU).
    return lax.dot_general(x.astype(dtype), kernel.astype(dtype), _NN).astype(out_dtype)
  # The gradients leave in the dtypes of x and kernel (static, like the compute dtype).
  return _mixed_dense(x, kernel, (dtype, out_dtype, x.dtype, kernel.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mixed_dense(x, kernel, dtypes):
  return _mixed_forward(x, kernel, dtypes)[0]


def _mixed_forward(x, kernel, dtypes):
  dtype, out_dtype = dtypes[:2]
  xc, kc = x.astype(dtype), kernel.astype(dtype)
  y = lax.dot_general(xc, kc, _NN, preferred_element_type=jnp.float32)  # [M, F]
  # The kernel itself is kept, not its cast copy: under a scanned layer stack a residual that
  # is the layer's slice of the stacked params is read from them in the backward, while a cast
  # copy is stacked anew for every layer (a compute-dtype copy of every kernel, trained or
  # frozen, for the whole backward; tests/test_dot.py measures it).
  return y.astype(out_dtype), (xc, kernel)


def _mixed_backward(dtypes, residuals, g):
  dtype, _, x_dtype, kernel_dtype = dtypes
  xc, kernel = residuals
  kc = kernel.astype(dtype)  # [K, F]
  gc = g.astype(dtype)  # [M, F]
  dx = lax.dot_general(gc, kc, _NT, preferred_element_type=jnp.float32)  # [M, K]
  dkernel = _weight_gradient(xc, gc)  # [K, F] float32
  return dx.astype(x_dtype), dkernel.astype(kernel_dtype)


_mixed_dense.defvjp(_mixed_forward, _mixed_backward)


def _token_block(m: int) -> int:
  """Rows per block of the 3-D transpose: the largest of 16, 8, 4, 2 dividing m (1: none)."""
  return next((c for c in (16, 8, 4, 2) if m % c == 0), 1)


def _weight_gradient(xc: Array, gc: Array) -> Array:
  """x^T g [K, F] in float32 from x [M, K], g [M, F] in the compute dtype (see module doc)."""
  m = xc.shape[0]
  c = _token_block(m)
  if c == 1 or jax.default_backend() != "cpu":
    # Accelerators take the transposed contraction natively.
    return lax.dot_general(xc, gc, _TN, preferred_element_type=jnp.float32)
  # x^T through a 3-D transpose: the same array as xc.T, but XLA does not fold it back into
  # the dot's dimension numbers as it does a plain transpose.
  x_t = xc.reshape(m // c, c, -1).transpose(2, 0, 1).reshape(-1, m)  # [K, M]
  return lax.dot_general(x_t, gc, _NN, preferred_element_type=jnp.float32)
