"""The tiny pipeline, run once per test session and shared (not a test module).

`tiny_pipeline_workdir` is a finished `configs/pipeline.py:size=tiny,smoke=1` workdir on the
bundled data: every stage, the evaluation and the report. xdist workers of one session share it
through a file lock (the first to come runs it, the others wait and read it); treat it as
read-only -- copy it, or pass it as `upstream=`, to run more stages.
"""
import contextlib
import fcntl
import os
import pathlib

import pytest

SMOKE_CONFIG = "configs/pipeline.py:size=tiny,smoke=1"


def tiny_pipeline_config(data_dir: str, tokenizer: str, **fields):
  """The smoke pipeline config on the bundled data and tokenizer; `fields`: {'ppo.kl.coef':
  0.1} style overrides (dots as on the command line)."""
  from rlhf_jax.config import util as config_util
  config = config_util.load_config(SMOKE_CONFIG)
  with config.unlocked():
    config.data_dir = data_dir
    config.tokenizer.path = tokenizer
    for key, value in fields.items():
      *path, name = key.split(".")
      section = config
      for part in path:
        section = section[part]
      section[name] = value
  return config


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(str(path) + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _finished(workdir: pathlib.Path) -> bool:
  from rlhf_jax.recipe import pipeline
  return (workdir / "report.md").exists() and all(
      (workdir / s / pipeline.DONE).exists() for s in pipeline.STAGES if s != "report")


@pytest.fixture(scope="session")
def tiny_pipeline_workdir(tmp_path_factory, bundled_data_dir, bundled_tokenizer):
  """A finished smoke pipeline workdir (about two minutes on 2 CPU cores, once per session)."""
  from rlhf_jax.recipe import pipeline
  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker has its own basetemp inside the session's: share the parent.
  root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny_pipeline"
  with _locked(root):
    if not _finished(root):
      pipeline.run_pipeline(tiny_pipeline_config(bundled_data_dir, bundled_tokenizer), str(root))
  return str(root)
