r"""Entry point: `python -m rlhf_jax.main --config=configs/<stage>.py:<args> --workdir=W`.

The config's `trainer` field picks the host loop. Any config field can be overridden on the
command line (`--config.optim.learning_rate=1e-4`); an unknown field is an error naming close
matches, and every bad value (rlhf_jax/config/validate.py) is listed before anything runs.
Running the same command again in the same workdir resumes from the last checkpoint.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax.config import overrides, validate
from rlhf_jax.core.logs import setup_logging
from rlhf_jax.train.launch import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  found = validate.problems(_CONFIG.value)  # launch.run checks too; here without a traceback
  if found:
    sys.exit(f"error: {validate.format_problems(found)}")
  setup_logging()
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=overrides.flags_parser("config"))
