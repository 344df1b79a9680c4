"""Running a config: the trainer registry, config checks and multi-host initialisation.

Free of command-line flags, so the CLI (main.py), the demo and tests all call `run` directly.
"""
import contextlib
import importlib
import logging

from rlhf_jax.config import validate
from rlhf_jax.models import dtype_probe
from rlhf_jax.core.logs import setup_logging  # noqa: F401 (re-exported for scripts)

log = logging.getLogger("rlhf_jax.train.launch")

TRAINERS = {
    "dpo": "rlhf_jax.train.preference",
    "kto": "rlhf_jax.train.preference",
    "lm": "rlhf_jax.train.lm",
    "ppo": "rlhf_jax.rl.trainer",
    "reward": "rlhf_jax.train.reward",
}


def maybe_initialize_distributed(dist_config) -> None:
  """jax.distributed.initialize from `config.distributed`, before any other JAX call."""
  if not (dist_config.initialize or dist_config.coordinator_address):
    return
  import jax
  # CPU processes exchange collectives over gloo (tests run 2 processes on localhost); the
  # setting only concerns the CPU backend, and asking which backend is used would start one.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if dist_config.coordinator_address:
    kwargs = dict(coordinator_address=dist_config.coordinator_address,
                  num_processes=dist_config.num_processes, process_id=dist_config.process_id)
  if dist_config.local_device_ids:
    kwargs["local_device_ids"] = [int(i) for i in str(dist_config.local_device_ids).split(",")]
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d", jax.process_index(), jax.process_count())


def run(config, workdir: str) -> dict:
  if config.trainer not in TRAINERS:
    raise ValueError(f"unknown trainer {config.trainer!r}; known: {sorted(TRAINERS)}")
  validate.validate_or_raise(config)  # every problem at once, before any work
  maybe_initialize_distributed(config.distributed)
  resolve_auto_dtype(config)
  return importlib.import_module(TRAINERS[config.trainer]).train(config, workdir)


def resolve_auto_dtype(config) -> None:
  """model.dtype='auto' becomes the dtype this machine computes fastest in (core/dtype_probe.py),
  before any model is built: the run folder's record and the report then name a concrete one."""
  if "model" in config and config.model.get("dtype") == dtype_probe.AUTO:
    with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
      config.model.dtype = dtype_probe.resolve_dtype(dtype_probe.AUTO)
    log.info("model.dtype=auto -> %s on this machine", config.model.dtype)
