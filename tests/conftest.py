"""Test setup: 8 fake CPU devices, so every sharding test runs on one CPU machine."""
import os

# Must be set before jax is imported anywhere.
# The tests' programs are tiny and each is compiled far more often than it runs: XLA's backend
# (LLVM) at optimisation level 0, without its expensive passes, compiles them faster (a cold
# `make test` took 1,679 s on a 2-core AVX2 EPYC with the defaults; slow compiling tests ran
# 15-30% faster). The numbers stay those of the same ops, in another instruction schedule:
# every float comparison in the suite is relative to the values' size. XLA's older fused-kernel
# emitters compile them faster again (the shared tiny pipeline with an empty cache, alone, in
# the order new, old, old, new: 130 / 111 s -> 88 / 91 s). Set RLHF_JAX_TEST_XLA_OPT=1 to test
# with XLA's defaults.
_FAST_COMPILE = ("" if os.environ.get("RLHF_JAX_TEST_XLA_OPT") == "1" else
                 " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                 " --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8" + _FAST_COMPILE).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A persistent XLA compilation cache for the whole test session, subprocesses included (they
# inherit the environment): xdist workers, the pipeline's stages and the multi-host test compile
# the same tiny train steps again and again, and compiling, not running, is most of their time.
# Keyed by XLA on the program and the flags, so it can never hand back a stale executable.
_TEST_CACHE = os.environ.get("RLHF_JAX_TEST_CACHE",
                             os.path.join(os.path.expanduser("~"), ".cache", "rlhf_jax", "tests"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_TEST_CACHE, "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end tests (run in CI too)")
  config.addinivalue_line(
      "markers", "heavy: minutes each (the real SmolLM2 / Gemma 3 weights, several processes, the "
      "notebook kernel, whole pipelines beyond the shared tiny one): `make test-all` runs them, "
      "`make test` (CI, under 15 minutes on 2 cores) leaves them out")


import contextlib  # noqa: E402
import fcntl  # noqa: E402
import hashlib  # noqa: E402
import pathlib  # noqa: E402


_REPO = pathlib.Path(__file__).resolve().parent.parent
_CACHE = pathlib.Path(_TEST_CACHE)


def _code_hash(*files: str) -> str:
  """Cached artefacts are keyed by the code that makes them, so a change never reads stale."""
  h = hashlib.sha256()
  for f in files:
    h.update((_REPO / f).read_bytes())
  return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  """A file lock: xdist workers (and parallel runs) build a cached artefact only once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(str(path) + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def bundled_data_dir():
  """Every bundled TFDS dataset, prepared once per code version (about 20 s the first time)."""
  from rlhf_jax.data import builders
  path = _CACHE / ("tfds-" + _code_hash("rlhf_jax/data/sources.py", "rlhf_jax/data/builders.py"))
  with _locked(path):
    done = path / "DONE"
    if not done.exists():
      import tensorflow_datasets as tfds
      tfds.disable_progress_bar()
      builders.prepare(data_dir=str(path))
      done.touch()
  return str(path)


@pytest.fixture(scope="session")
def bundled_tokenizer():
  """A 2048-piece tokenizer trained on the bundled text, once per code version."""
  from rlhf_jax.text import tokenizer as tok_lib
  from rlhf_jax.train.inputs import tokenizer_corpus
  path = _CACHE / ("tokenizer-" + _code_hash("rlhf_jax/text/tokenizer.py", "rlhf_jax/data/sources.py"))
  model = path / "tokenizer.model"
  with _locked(path):
    if not model.exists():
      path.mkdir(parents=True, exist_ok=True)
      tok_lib.train_tokenizer(tokenizer_corpus(), str(model)[:-len(".model")], 2048,
                              character_coverage=0.995)
  return str(model)


# The tiny pipeline, run once per session (tests/pipeline_fixture.py).
from pipeline_fixture import tiny_pipeline_workdir  # noqa: E402,F401


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """`--dist loadgroup` sends the tests of one `xdist_group` to one worker, so a fixture they
  share is built once. xdist marks a group by suffixing the test's node id with `@group`, but
  since pytest 9.2 a node id is a structured `_id` and xdist's write to `_nodeid` is lost: every
  group was split over both workers, and each worker built the shared fixtures again (the
  planted reward-model run: 2 x 92 s). This writes the suffix where this pytest keeps it."""
  if not getattr(config.option, "loadgroup", False):  # set on the workers by xdist
    return
  for item in items:
    groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                     for m in item.iter_markers("xdist_group")})
    if not groups or "@" in item.nodeid:
      continue  # no group, or xdist's own suffix took effect (pytest < 9.2)
    nodeid = f"{item.nodeid}@{'_'.join(groups)}"
    if hasattr(item, "_id"):
      from _pytest.nodeid import coerce_node_id
      item._id = coerce_node_id(nodeid)
    else:
      item._nodeid = nodeid
