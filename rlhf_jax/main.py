r"""Entry point: `python -m rlhf_jax.main --config=configs/<stage>.py:<args> --workdir=W`.

The config's `trainer` field picks the host loop. Any config field can be overridden on the
command line (`--config.optim.learning_rate=1e-4`); an unknown field is an error naming close
matches. Running the same command again in the same workdir resumes from the last checkpoint.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

log = logging.getLogger("rlhf_jax.main")  # not __name__: that is "__main__" under -m

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")

TRAINERS = {
    "lm": "rlhf_jax.trainers.lm",
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


def setup_logging() -> None:
  """Our own progress at INFO; the libraries' (orbax logs every file it writes) at WARNING."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("rlhf_jax").setLevel(logging.INFO)


def run(config, workdir: str) -> dict:
  import importlib
  if config.trainer not in TRAINERS:
    raise ValueError(f"unknown trainer {config.trainer!r}; known: {sorted(TRAINERS)}")
  maybe_initialize_distributed(config.distributed)
  return importlib.import_module(TRAINERS[config.trainer]).train(config, workdir)


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  setup_logging()
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
