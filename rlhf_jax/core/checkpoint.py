"""A thin wrapper over orbax's CheckpointManager: save, restore, resume.

A checkpoint holds five items, so each can be read alone:
  params     the model params (a later stage initialises from these only)
  train      optimizer state, step and rng key data
  data       the input iterator's position (JSON), so a resumed run sees the same next batch
  config     the run's config (JSON), so a workdir says what made it
  checksums  a CRC-32 of every saved array (JSON), checked on every restore: bytes flipped
             inside a params file are an error naming the tensor and the file, never silently
             wrong weights. `verify=False` skips it (huge models; said in the log).

Restoring onto the shardings of a freshly built abstract state puts each shard straight onto its
device (orbax restores bit-exactly onto a different mesh). A checkpoint whose shapes differ from
the model being built is a clear error naming the tensor and both shapes, never a silent reshape.
"""
from __future__ import annotations

import functools
import logging
import os
import zlib
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("params", "train", "data", "config", "checksums")


class CheckpointShapeError(ValueError):
  pass


class CheckpointCorruptError(ValueError):
  """A restored array whose bytes are not the ones saved."""


def checksums(tree) -> dict[str, str] | None:
  """{'layer_0/attn/q/kernel': CRC-32 of its bytes}; None when an array is not wholly on this
  process (several hosts): each process sees only its shards."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    if not getattr(leaf, "is_fully_addressable", True):
      return None
    data = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    out["/".join(_key_name(e) for e in path)] = f"{zlib.crc32(data.view(np.uint8)):08x}"
  return out


def verify(saved: dict | None, tree, where: str) -> None:
  """CheckpointCorruptError naming every tensor whose CRC-32 differs from the saved one."""
  if not saved:
    return
  now = checksums(tree)
  if now is None:
    return
  bad = sorted(name for name, crc in now.items() if saved.get(name) not in (None, crc))
  if bad:
    shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    raise CheckpointCorruptError(
        f"{where}: {len(bad)} tensor(s) differ from what was saved (CRC-32 mismatch): {shown}. "
        "The checkpoint's files are corrupt; use an earlier step or re-create the run.")


def _abstract(tree):
  """ShapeDtypeStructs (with shardings) of a tree of arrays or abstract arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _key_name(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _flat_shapes(tree) -> dict[str, tuple]:
  """{'layer_0/attn/q/kernel': shape}: dicts, lists and namedtuples alike (orbax stores
  namedtuples as dicts, so a path must not depend on the container type)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(e) for e in path): tuple(leaf.shape) for path, leaf in flat}


def check_shapes(saved, expected, what: str) -> None:
  """Raises CheckpointShapeError listing every tensor whose shape or presence differs."""
  saved_shapes, expected_shapes = _flat_shapes(saved), _flat_shapes(expected)
  problems = []
  for name in sorted(set(saved_shapes) | set(expected_shapes)):
    a, b = saved_shapes.get(name), expected_shapes.get(name)
    if a != b:
      problems.append(f"  {name}: checkpoint {a if a is not None else 'missing'}, "
                      f"model {b if b is not None else 'missing'}")
  if problems:
    shown = "\n".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more"
                                        if len(problems) > 12 else "")
    raise CheckpointShapeError(
        f"{what} does not match the model being built ({len(problems)} tensors differ):\n{shown}\n"
        "Use a fresh --workdir, or the config that wrote this checkpoint.")


@functools.lru_cache(maxsize=None)
def _write_each_array_once_on_cpu() -> None:
  """On CPU devices, orbax saves every array from one replica, not split over its replicas.

  Replica-parallel saving splits a replicated array into one slice per device so that the
  devices write in parallel: worth it where each device has its own link to storage (TPU
  hosts), pointless where the "devices" are one process's memory. There the slices cost eager
  jax slicing, compiled per array shape: 8 s of a tiny SFT run's first save with 8 CPU devices
  (tests/conftest.py), more than the run's training steps."""
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
  """Saves and restores {params, train, data, config} under `directory`."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 3, async_save: bool = True,
               verify: bool = True):
    _write_each_array_once_on_cpu()
    self.directory = os.path.abspath(directory)
    self.verify = verify
    if not verify:
      log.info("checkpoints in %s: checksums neither written nor verified (verify=False)",
               self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    # Handlers named up front, so a fresh process can read metadata before any save/restore.
    handlers = dict(params=ocp.StandardCheckpointHandler(), train=ocp.StandardCheckpointHandler(),
                    data=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler(),
                    checksums=ocp.JsonCheckpointHandler())
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, params, train, data: dict, config: dict, force: bool = False) -> bool:
    """Saves `step` (when due, or always with `force`); a step already saved is left as it is,
    so a forced save right after a periodic one of the same step (stop_after, preemption, the
    final save) is a no-op rather than orbax's StepAlreadyExistsError."""
    if int(step) in self.manager.all_steps():
      return False
    if not (force or self.manager.should_save(int(step))):
      return False
    sums = {"params": checksums(params), "train": checksums(train)} if self.verify else {}
    return self.manager.save(
        int(step), force=force,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave(data or {}), config=ocp.args.JsonSave(config or {}),
            checksums=ocp.args.JsonSave(sums)))

  def saved_checksums(self, step: int) -> dict:
    """The CRC-32s saved with a step ({} for a checkpoint written before they were)."""
    if not self.verify or "checksums" not in os.listdir(os.path.join(self.directory, str(step))):
      return {}
    return self.manager.restore(step, args=ocp.args.Composite(
        checksums=ocp.args.JsonRestore())).checksums or {}

  def verified(self, step: int, item: str, tree, saved: Optional[dict] = None):
    """`tree` after checking it against the CRC-32s saved for `item` at `step` (`saved`: the
    step's checksums when the caller has read them already)."""
    saved = self.saved_checksums(step) if saved is None else saved
    verify(saved.get(item), tree, f"{os.path.join(self.directory, str(step), item)}")
    return tree

  def saved_tree(self, step: int, item: str):
    """The saved tree of an item (metadata only: shapes and dtypes, nothing is read)."""
    metadata = self.manager.item_metadata(step)
    tree = metadata[item]
    return getattr(tree, "tree", tree)

  def restore(self, step: Optional[int], params, train=None):
    """Restores onto the shapes/shardings of `params` (and `train`, if given).

    Returns (params, train or None, data dict, config dict).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    check_shapes(self.saved_tree(step, "params"), params,
                 f"checkpoint {self.directory} step {step} (params)")
    args = dict(params=ocp.args.StandardRestore(_abstract(params)),
                data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
    if train is not None:
      check_shapes(self.saved_tree(step, "train"), train,
                   f"checkpoint {self.directory} step {step} (optimizer state)")
      args["train"] = ocp.args.StandardRestore(_abstract(train))
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    sums = self.saved_checksums(step)  # read once for both items
    restored_train = self.verified(step, "train", out.train, sums) if train is not None else None
    return self.verified(step, "params", out.params, sums), restored_train, out.data, out.config

  def read_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, params_like, step: Optional[int] = None):
  """Params only, from an orbax checkpoint directory, onto the shapes and shardings of
  `params_like` (core/run_folder.restore_params also takes run folders and pretrained models)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory {directory}")
  ckpt = Checkpointer(directory, max_to_keep=None, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    check_shapes(ckpt.saved_tree(step, "params"), params_like,
                 f"checkpoint {directory} step {step}")
    out = ckpt.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params_like))))
    log.info("initialised params from %s step %d", directory, step)
    return ckpt.verified(step, "params", out.params)
  finally:
    ckpt.close()


def saved_params_tree(directory: str, step: Optional[int] = None):
  """The saved params' tree of a checkpoint directory (shapes and dtypes; nothing is read)."""
  ckpt = Checkpointer(directory, max_to_keep=None, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    return ckpt.saved_tree(step, "params")
  finally:
    ckpt.close()


def placed_like(params, params_like, what: str):
  """`params` (checked against `params_like`'s shapes) on `params_like`'s shardings."""
  check_shapes(params, params_like, what)
  return jax.tree.map(lambda x, like: jax.device_put(x, getattr(like, "sharding", None)),
                      params, params_like)


def read_params(directory: str, step: Optional[int] = None, device=None):
  """Params of a checkpoint onto one device, whatever mesh or process count saved them.

  For tools that look at a run (evaluation, chat, tests); trainers use `restore_params`, which
  places shards onto a mesh.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory {directory}")
  device = device or jax.local_devices()[0]
  ckpt = Checkpointer(directory, max_to_keep=None, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    saved = ckpt.saved_tree(step, "params")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(
        m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), saved)
    out = ckpt.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))
    return ckpt.verified(step, "params", out.params)
  finally:
    ckpt.close()
