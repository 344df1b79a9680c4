"""An int8 frozen base under LoRA (`lora.base_quant = 'int8'`): the QLoRA idea, in int8.

Why: under LoRA the base projections never change, yet they are most of the memory a LoRA
run holds (PPO's reference, the policy's and critic's trunks and the RM's share one base, but
it is still the whole model in float32). Stored as int8 with one float32 scale per output
column, a base projection takes a quarter of the bytes; the adapters, the heads, the norms and
the embedding stay float32. The adapters then train on the quantised base, so the model they
fit is that base plus themselves: folding (export, chat, a later stage) adds them to the
dequantised kernels, which is exactly the function that was trained.

Scheme: symmetric, per output column. For a kernel W with input axes I (a projection's
contraction axes) and the rest O, scale[o] = max_i |W[i, o]| / 127 and q = round(W / scale),
so |W - q * scale| <= scale / 2 elementwise. Stored as the kernel's own param name (int8, the
kernel's shape) and `<name>_scale` (float32, the kernel's shape with each input axis 1), so the
scale broadcasts onto the kernel and carries the output axes' logical names for sharding.

Which kernels: those of the projections LoRA targets (`lora_targets`), whether or not the
adapters are on, so the reference (the same base with its adapters off) reads the same int8
params. A projection that is not adapted stays float32.

The matmul is `int8_dense`, with its own VJP: autodiff of `x @ dequantize(q, scale)` would keep
each layer's dequantised float kernel as a residual for the backward's x-gradient, i.e. the
whole base in float32 again during a LoRA update. Here the backward keeps q and the scale (the
base's own int8 buffers) and dequantises again; no weight gradient is formed (the base is
frozen), so x is not kept either.
"""
from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.dot import dense

MODES = ("", "int8")
SCALE_SUFFIX = "_scale"
SCANNED = "layers"  # a scanned stack's params carry a leading layer axis (lora.SCANNED)


def quantized(config, path: str) -> bool:
  """Whether the projection at `path` keeps an int8 kernel under `config` (a ModelConfig)."""
  return bool(config is not None and config.lora_base_quant
              and re.search(config.lora_targets, path) is not None)


def quantize(w, n_in: int, lead: int = 0):
  """(q int8, scale float32) of a float kernel whose axes lead..lead+n_in are its input axes
  (lead: a scanned stack's layer axis). scale keeps those axes with size 1."""
  w = jnp.asarray(w, jnp.float32)
  axes = tuple(range(lead, lead + n_in))
  scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column: q = 0 at any scale
  q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize(q, scale, dtype=jnp.float32):
  return q.astype(dtype) * scale.astype(dtype)


class Int8Kernel(NamedTuple):
  """A projection's int8 kernel and its scale (the scale's input axes have size 1)."""
  q: jax.Array
  scale: jax.Array

  def matrix(self, k: int) -> "Int8Kernel":
    """The [K, F] form (k = K): what `project` multiplies by."""
    return Int8Kernel(self.q.reshape(k, -1), self.scale.reshape(1, -1))


def kernel(module: nn.Module, name: str, init, shape: tuple, axes: tuple, n_in: int, config):
  """A projection's kernel [*shape]: its own float32 param, or under `lora.base_quant` an
  Int8Kernel of the int8 param `name` and float32 `name_scale`. n_in: how many leading axes of
  `shape` are input axes. The int8 param initialises to zeros: a quantised base is always
  loaded (trainers put the real base in; quantize_tree makes it)."""
  path = "/".join(module.scope.path + (() if name == "kernel" else (name,)))
  if not quantized(config, path):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
  scale_shape = tuple(1 if i < n_in else d for i, d in enumerate(shape))
  scale_axes = tuple(None if i < n_in else a for i, a in enumerate(axes))
  q = module.param(name, nn.with_logical_partitioning(
      lambda key, s, dtype: jnp.zeros(s, dtype), axes), shape, jnp.int8)
  scale = module.param(name + SCALE_SUFFIX, nn.with_logical_partitioning(
      nn.initializers.ones, scale_axes), scale_shape, jnp.float32)
  return Int8Kernel(q, scale)


def project(x: jax.Array, kernel, k: int, dtype, out_dtype=None) -> jax.Array:
  """x [N, K] @ kernel as [K, F] (k = K): `dot.dense` for a float kernel, `int8_dense` for an
  Int8Kernel."""
  if isinstance(kernel, Int8Kernel):
    m = kernel.matrix(k)
    return int8_dense(x, m.q, m.scale, (jnp.dtype(dtype), jnp.dtype(out_dtype or dtype)))
  return dense(x, kernel.reshape(k, -1), dtype, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def int8_dense(x, q, scale, dtypes):
  """x [N, K] @ (q [K, F] * scale [1, F]) in dtypes = (compute, output) dtype (dot.dense's
  precision rules); the gradient reaches x only."""
  return dense(x, dequantize(q, scale), dtypes[0], dtypes[1])


def _int8_forward(x, q, scale, dtypes):
  # Residuals: the int8 kernel and its scale (the base's own buffers), and an empty array
  # that carries x's dtype for the gradient (residuals must be arrays).
  return int8_dense(x, q, scale, dtypes), (q, scale, jnp.zeros((0,), x.dtype))


def _int8_backward(dtypes, residuals, g):
  q, scale, x_like = residuals
  w = dequantize(q, scale, dtypes[0])  # [K, F], made again rather than kept
  dx = jax.lax.dot_general(g.astype(dtypes[0]), w, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)  # [N, K]
  return (dx.astype(x_like.dtype), np.zeros(q.shape, jax.dtypes.float0),
          jnp.zeros_like(scale))


int8_dense.defvjp(_int8_forward, _int8_backward)


# ------------------------------------------------------------------------------ param trees


def _input_axes(keys: tuple) -> int:
  """How many input axes a kernel at `keys` has: the attention output `o` [H, Dh, D] two,
  every other projection (q/k/v [D, H, Dh], MLP [K, F]) one."""
  return 2 if keys[-1] == "o" else 1


def quantize_tree(params, config) -> dict:
  """The float params with every kernel `quantized(config, path)` names turned into int8 and a
  scale: the layout `kernel` creates. A kernel's path is its module's ('layer_0/attn/q'); the
  attention output is the param 'o' itself ('layer_0/attn/o'), as in `kernel`."""
  def go(tree, keys):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for k, v in tree.items():
      here = keys + (k,)
      leaf = not isinstance(v, dict)
      path = "/".join(str(x) for x in (keys if k == "kernel" else here))
      if leaf and np.issubdtype(v.dtype, np.floating) and _is_kernel(here) \
          and quantized(config, path):
        lead = 1 if SCANNED in here else 0
        out[k], out[k + SCALE_SUFFIX] = quantize(v, _input_axes(here), lead)
      else:
        out[k] = go(v, here)
    return out
  return go(dict(nn.unbox(params)), ())


def _is_kernel(keys: tuple) -> bool:
  return keys[-1] in ("kernel", "o")


def _map_int8(params, fn) -> dict:
  """The tree with each int8 kernel replaced by fn(q, scale) and its `_scale` dropped."""
  def go(tree):
    if not isinstance(tree, dict):
      return tree
    out = {}
    for key, v in tree.items():
      if str(key).endswith(SCALE_SUFFIX) and str(key)[:-len(SCALE_SUFFIX)] in tree:
        continue
      scale = tree.get(f"{key}{SCALE_SUFFIX}")
      out[key] = fn(v, scale) if scale is not None else go(v)
    return out
  return go(dict(nn.unbox(params)))


def dequantize_tree(params) -> dict:
  """Float params from a tree with int8 kernels (each beside its `_scale`): what folding,
  export and chat read."""
  return _map_int8(params, dequantize)


def is_quantized(params) -> bool:
  return any(getattr(leaf, "dtype", None) == jnp.int8
             for leaf in jax.tree.leaves(nn.unbox(params)))


def float_like(params_like) -> Any:
  """The float base's abstract tree (shapes, dtypes, shardings) for a quantised `params_like`:
  what a checkpoint or a pretrained model is read into before quantize_tree."""
  return _map_int8(params_like, lambda q, _: jax.ShapeDtypeStruct(
      q.shape, jnp.float32, sharding=getattr(q, "sharding", None)))
