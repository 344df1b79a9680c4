"""Per-device memory of a training config on a mesh, from shapes alone (nothing is allocated).

Planning a 1B or 8B run on a TPU slice starts with "does it fit": this answers it on a laptop.
The model's abstract params (`jax.eval_shape` of init) carry logical axis names; the config's
axis rules map them onto the mesh exactly as `sharding.logical_shardings` does for a real run
(an axis that does not divide a dimension is dropped there too), so the parameter, gradient and
AdamW-state bytes per device are exact. Activations are an estimate: what the backward pass
keeps per token and layer (all of it, or with `model.remat` only each layer's input plus one
layer's worth), attention probabilities, and the float32 logits with their gradient.

  estimate_memory(config, {"data": 2, "fsdp": 16, "tensor": 1})  # -> bytes per device, by part
"""
from __future__ import annotations

import math
from typing import Mapping, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh, PartitionSpec as P

from rlhf_jax.core import sharding as sharding_lib
from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.models.hf_import import abstract_params

GiB = 1 << 30


def _abstract_mesh(mesh) -> AbstractMesh:
  if isinstance(mesh, Mapping):
    sizes = tuple(int(mesh.get(a, 1)) for a in sharding_lib.MESH_AXES)
    if any(s < 1 for s in sizes):
      raise ValueError(f"give every mesh axis a positive size here (no -1), got {dict(mesh)}")
    return AbstractMesh(sizes, sharding_lib.MESH_AXES)
  return AbstractMesh(tuple(mesh.shape[a] for a in mesh.axis_names), tuple(mesh.axis_names))


def _model_config(config) -> ModelConfig:
  fields = {k: v for k, v in config.model.to_dict().items() if k != "size"}
  return ModelConfig(**fields)


def param_bytes_per_device(model_config: ModelConfig, mesh, rules=None) -> int:
  """float32 parameter bytes on the most loaded device (exact; shardings as a real run)."""
  abstract = abstract_params(model_config)
  mesh = _abstract_mesh(mesh)
  rules = sharding_lib.axis_rules(rules)
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract), rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract))

  def shard_bytes(spec, shape) -> int:
    fitted = sharding_lib._fit_spec(spec, shape, mesh)
    shard = list(shape)
    for i, axes in enumerate(tuple(fitted) + (None,) * (len(shape) - len(fitted))):
      names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      shard[i] //= math.prod(mesh.shape[n] for n in names)
    return math.prod(shard) * 4

  sizes = jax.tree.map(shard_bytes, specs, shapes, is_leaf=lambda x: isinstance(x, P))
  return int(sum(jax.tree.leaves(sizes)))


def estimate_memory(config, mesh: Union[Mapping[str, int], object, None] = None) -> dict:
  """Bytes per device of training `config` on `mesh` (a Mesh, or {'data', 'fsdp', 'tensor'}
  sizes; default: config.mesh, which must then have no -1). Keys: params, grads, optimizer,
  activations, total, and `per_device_rows` (batch rows each device holds per micro-batch)."""
  mesh = config.mesh.to_dict() if mesh is None else mesh
  abstract_mesh = _abstract_mesh(mesh)
  rules = sharding_lib.axis_rules(config.get("axis_rules"))
  cfg = _model_config(config)
  params = param_bytes_per_device(cfg, abstract_mesh, rules)

  batch_axes = dict(rules).get("batch") or ()
  batch_axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,)
  shards = math.prod(abstract_mesh.shape[a] for a in batch_axes)
  rows = max(config.data.batch_size // (shards * config.optim.get("grad_accum", 1)), 1)
  t = config.data.seq_len
  tensor = abstract_mesh.shape["tensor"]
  act = np.dtype(cfg.dtype).itemsize
  d, f, dh, h, hkv = cfg.d_model, cfg.d_ff, cfg.dim_per_head, cfg.n_heads, cfg.n_kv_heads
  # Kept for the backward pass, per token and layer: residual stream, norms, attention and MLP
  # outputs (~6 D), q/k/v/attention output, SwiGLU's gate/up/product; probabilities in float32.
  per_layer = (6 * d + (2 * h + 2 * hkv) * dh / tensor + 3 * f / tensor) * act
  per_layer += 2 * h / tensor * t * 4
  layers = (cfg.n_layers * d * act + per_layer) if cfg.remat else cfg.n_layers * per_layer
  logits = 2 * cfg.vocab_size / tensor * 4  # float32 logits and their gradient
  activations = int(rows * t * (layers + logits))
  out = dict(params=params, grads=params, optimizer=2 * params, activations=activations)
  out["total"] = sum(out.values())
  out["per_device_rows"] = rows
  return out


def format_memory(estimate: dict) -> str:
  parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in estimate.items() if k != "per_device_rows")
  return f"GiB per device: {parts}"
