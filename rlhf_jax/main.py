r"""Entry point: `python -m rlhf_jax.main --config=configs/<stage>.py:<args> --workdir=W`.

The config's `trainer` field picks the host loop. Any config field can be overridden on the
command line (`--config.optim.learning_rate=1e-4`); an unknown field is an error naming close
matches. Running the same command again in the same workdir resumes from the last checkpoint.
"""
from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.core.launch import run, setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  setup_logging()
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
