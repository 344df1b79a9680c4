"""Logging set-up for every command: our progress at INFO, the libraries' at WARNING."""
import logging


def setup_logging() -> None:
  """Our own progress at INFO; the libraries' (orbax logs every file it writes) at WARNING."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("rlhf_jax").setLevel(logging.INFO)
