"""A thin wrapper over orbax's CheckpointManager: save, restore, resume.

A checkpoint holds four items, so each can be read alone:
  params   the model params (a later stage initialises from these only)
  train    optimizer state, step and rng key data
  data     the input iterator's position (JSON), so a resumed run sees the same next batch
  config   the run's config (JSON), so a workdir says what made it

Restoring onto the shardings of a freshly built abstract state puts each shard straight onto its
device (orbax restores bit-exactly onto a different mesh). A checkpoint whose shapes differ from
the model being built is a clear error naming the tensor and both shapes, never a silent reshape.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("params", "train", "data", "config")


class CheckpointShapeError(ValueError):
  pass


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


class Checkpointer:
  """Saves and restores {params, train, data, config} under `directory`."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    # Handlers named up front, so a fresh process can read metadata before any save/restore.
    handlers = dict(params=ocp.StandardCheckpointHandler(), train=ocp.StandardCheckpointHandler(),
                    data=ocp.JsonCheckpointHandler(), config=ocp.JsonCheckpointHandler())
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
    return self.manager.save(
        int(step), force=force,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
            data=ocp.args.JsonSave(data or {}), config=ocp.args.JsonSave(config or {})))

  def _saved_tree(self, step: int, item: str):
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
    check_shapes(self._saved_tree(step, "params"), params,
                 f"checkpoint {self.directory} step {step} (params)")
    args = dict(params=ocp.args.StandardRestore(_abstract(params)),
                data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())
    if train is not None:
      check_shapes(self._saved_tree(step, "train"), train,
                   f"checkpoint {self.directory} step {step} (optimizer state)")
      args["train"] = ocp.args.StandardRestore(_abstract(train))
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out.params, out.get("train") if train is not None else None, out.data, out.config

  def read_config(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def restore_params(directory: str, params_like, step: Optional[int] = None):
  """Params only, from another run's checkpoint directory (e.g. SFT initialised from pretrain),
  or from a pretrained Hugging Face directory / GGUF file / preset name (models/hf_import.py)."""
  from rlhf_jax.models import hf_import, pretrained
  source = pretrained.resolve(directory)
  if hf_import.is_pretrained_path(source):
    return hf_import.load_params_like(source, params_like)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory {directory}")
  ckpt = Checkpointer(directory, max_to_keep=None, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    check_shapes(ckpt._saved_tree(step, "params"), params_like,
                 f"checkpoint {directory} step {step}")
    out = ckpt.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params_like))))
    log.info("initialised params from %s step %d", directory, step)
    return out.params
  finally:
    ckpt.close()


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
    saved = ckpt._saved_tree(step, "params")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(
        m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)), saved)
    out = ckpt.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target)))
    return out.params
  finally:
    ckpt.close()
