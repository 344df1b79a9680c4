"""Sharding as data: a device mesh from the config, logical axis rules, and sharded state.

Params carry logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `kv`, `vocab`, `layers`);
activations carry (`batch`, `length`, ...). `config.axis_rules` maps each logical name to a mesh
axis (`data`, `fsdp`, `tensor`) or to nothing. Changing the mesh or the rules never touches model
code: the same train step runs on one CPU, 8 fake devices in tests, or a TPU pod slice.

State is created sharded: `jax.eval_shape` of the init gives shapes and logical names without
allocating, the names become `NamedSharding`s, and a `jit(init, out_shardings=...)` materialises
each shard where it belongs, so no device ever holds a full copy of a model that is split.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(mesh_config: Mapping[str, int], n_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor); one axis may be -1 (= the devices the others leave)."""
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; mesh axes are {MESH_AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {n_devices} devices")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
                     f"but {n_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def axis_rules(config_rules) -> tuple[tuple[str, Any], ...]:
  """Axis rules from the config (a list of [name, mesh_axis_or_list_or_None] pairs)."""
  if not config_rules:
    return DEFAULT_AXIS_RULES
  return tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config_rules)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide a dimension (that dim is then replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    for name in names:
      if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[name]) == 0:
        kept.append(name)
    if len(kept) != len(names):
      log.info("dimension %d does not divide over mesh axes %s; using %s", dim, names, kept)
    fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
  return P(*fitted)


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) ShapeDtypeStructs."""
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_tree))
  return jax.tree.map(lambda spec, shape: NamedSharding(mesh, _fit_spec(spec, shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Batch arrays are split along their leading axis over the mesh axes `batch` maps to."""
  batch_axes = dict(rules).get("batch")
  return NamedSharding(mesh, P(batch_axes, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split (the global batch must be a multiple)."""
  axes = dict(rules).get("batch") or ()
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict:
  """Global jax.Arrays from each process's local rows (multi-host: each feeds its own share)."""
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    sharding = batch_sharding(mesh, rules, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def create_sharded(init_fn, mesh: Mesh, rules, *args):
  """Runs `init_fn(*args)` (which returns a boxed pytree) directly into its sharded layout.

  Returns (unboxed state, shardings of the state).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  # No logical rules in scope here: the out_shardings alone place every shard, and flax's
  # DenseGeneral reshapes its kernel inside init, where a rank-specific constraint would fail.
  with jax.set_mesh(mesh):
    state = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return state, shardings


def copy_tree(tree, shardings):
  """A copy in fresh buffers: a tree that aliases a state would be donated with it (a policy's
  buffers go to its step; the reference made from them must not)."""
  return jax.jit(lambda t: jax.tree.map(jax.numpy.copy, t), out_shardings=shardings)(tree)
