"""model.dtype = "auto" (rlhf_jax/models/dtype_probe.py): every branch forced by replacing the
backend, the CPU flags and the probe; the cache file read back; the real probe run once."""
import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax.config import validate
from rlhf_jax.models import dtype_probe

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
flags\t\t: fpu sse avx2 avx512f {extra}

processor\t: 1
model name\t: Test CPU 9000
flags\t\t: fpu sse avx2 avx512f {extra}
"""


@pytest.fixture
def machine(monkeypatch, tmp_path):
  """A CPU host whose flags and probe timings the test sets; counts the probes it runs."""
  state = {"flags": "", "timings": {"float32_s": 1.0, "bfloat16_s": 1.0}, "probes": 0}

  def fake_probe():
    state["probes"] += 1
    return dict(state["timings"])

  def fake_cpu_info():
    return "Test CPU 9000", frozenset(state["flags"].split())

  monkeypatch.setattr(dtype_probe, "backend", lambda: "cpu")
  monkeypatch.setattr(dtype_probe, "cpu_info", fake_cpu_info)
  monkeypatch.setattr(dtype_probe, "probe", fake_probe)
  state["cache"] = str(tmp_path / "cache" / "dtype_probe.json")
  return state


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_concrete_dtype_is_kept_without_probing(machine, dtype):
  machine["flags"] = "avx512_bf16"
  assert dtype_probe.resolve_dtype(dtype, machine["cache"]) == dtype
  assert machine["probes"] == 0


@pytest.mark.parametrize("name", ["gpu", "tpu"])
def test_accelerators_take_bfloat16(machine, monkeypatch, name):
  monkeypatch.setattr(dtype_probe, "backend", lambda: name)
  assert dtype_probe.resolve_dtype("auto", machine["cache"]) == "bfloat16"
  assert machine["probes"] == 0


def test_a_cpu_without_bf16_flags_takes_float32_without_probing(machine):
  machine["flags"] = "fpu avx2 avx512f"
  machine["timings"] = {"float32_s": 9.0, "bfloat16_s": 1.0}  # would say bf16, never asked
  assert dtype_probe.resolve_dtype("auto", machine["cache"]) == "float32"
  assert machine["probes"] == 0


# MIN_SPEEDUP is 1.1: 2x and 1.2x faster choose bf16; 1.05x (noise) and slower keep float32.
@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
@pytest.mark.parametrize("f32,bf16,want", [(2.0, 1.0, "bfloat16"), (1.2, 1.0, "bfloat16"),
                                           (1.05, 1.0, "float32"), (1.0, 1.5, "float32")])
def test_bf16_flags_let_the_probe_decide(machine, flag, f32, bf16, want):
  machine["flags"] = f"avx2 {flag}"
  machine["timings"] = {"float32_s": f32, "bfloat16_s": bf16}
  assert dtype_probe.resolve_dtype("auto", machine["cache"]) == want
  assert machine["probes"] == 1


def test_the_probe_runs_once_then_the_cache_answers(machine):
  machine["flags"] = "avx512_bf16"
  machine["timings"] = {"float32_s": 2.0, "bfloat16_s": 1.0}
  assert dtype_probe.resolve_dtype("auto", machine["cache"]) == "bfloat16"
  with open(machine["cache"]) as f:
    stored = json.load(f)
  key = dtype_probe.cache_key("Test CPU 9000", frozenset({"avx512_bf16"}))
  assert stored == {key: {"float32_s": 2.0, "bfloat16_s": 1.0, "dtype": "bfloat16"}}
  assert "Test CPU 9000" in key and "avx512_bf16" in key and jax.__version__ in key
  # A later process: the probe would now say float32, but the cached answer stands.
  machine["timings"] = {"float32_s": 1.0, "bfloat16_s": 2.0}
  assert dtype_probe.resolve_dtype("auto", machine["cache"]) == "bfloat16"
  assert machine["probes"] == 1
  # Another chip (here: one more bf16 flag) is another key: probed again, both entries kept.
  machine["flags"] = "avx512_bf16 amx_bf16"
  assert dtype_probe.resolve_dtype("auto", machine["cache"]) == "float32"
  assert machine["probes"] == 2
  with open(machine["cache"]) as f:
    assert len(json.load(f)) == 2


def test_a_new_jax_version_probes_again(machine, monkeypatch):
  machine["flags"] = "avx512_bf16"
  machine["timings"] = {"float32_s": 2.0, "bfloat16_s": 1.0}
  dtype_probe.resolve_dtype("auto", machine["cache"])
  monkeypatch.setattr(jax, "__version__", "99.0.0")
  dtype_probe.resolve_dtype("auto", machine["cache"])
  assert machine["probes"] == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 1}'])
def test_an_unreadable_cache_is_probed_and_rewritten(machine, content):
  machine["flags"] = "amx_bf16"
  machine["timings"] = {"float32_s": 3.0, "bfloat16_s": 1.0}
  os.makedirs(os.path.dirname(machine["cache"]))
  with open(machine["cache"], "w") as f:
    f.write(content)
  assert dtype_probe.resolve_dtype("auto", machine["cache"]) == "bfloat16"
  assert machine["probes"] == 1
  with open(machine["cache"]) as f:
    assert any(v == {"float32_s": 3.0, "bfloat16_s": 1.0, "dtype": "bfloat16"}
               for v in json.load(f).values())


def test_cpu_info_reads_the_model_and_flags(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(CPUINFO.format(extra="avx512_bf16"))
  model, flags = dtype_probe.cpu_info(str(path))
  assert model == "Test CPU 9000"
  assert {"avx2", "avx512f", "avx512_bf16"} <= flags and "amx_bf16" not in flags
  assert dtype_probe.cpu_info(str(tmp_path / "absent")) == ("", frozenset())


def test_the_real_probe_times_both_dtypes():
  seconds = dtype_probe.time_matmul("bfloat16", shape=(64, 32, 48), reps=2)
  assert np.isfinite(seconds) and 0 < seconds < 10


def test_auto_on_this_machine_is_a_concrete_dtype(tmp_path):
  got = dtype_probe.resolve_dtype("auto", str(tmp_path / "probe.json"))
  assert got in ("float32", "bfloat16")
  _, flags = dtype_probe.cpu_info()
  if jax.default_backend() == "cpu" and not flags & set(dtype_probe.BF16_FLAGS):
    assert got == "float32"


def _model_problems(dtype, **extra):
  from configs import sft
  config = sft.get_config("size=tiny")
  config.model.dtype = dtype
  for k, v in extra.items():
    config.model[k] = v
  return [p for p in validate.problems(config) if p.startswith("model.")]


def test_validation_accepts_auto_and_a_vocab_chunk():
  assert _model_problems("auto") == []
  assert _model_problems("float32", vocab_chunk=4096) == []
  assert _model_problems("float32", vocab_chunk=0) == []
  assert any("model.dtype" in p for p in _model_problems("float64"))
  assert any("model.vocab_chunk" in p for p in _model_problems("float32", vocab_chunk=-1))


def test_every_process_takes_process_zeros_answer(machine, monkeypatch):
  """This host would say float32 (no bf16 flags); process 0 measured bfloat16 faster."""
  sent = []

  def fake_broadcast(index):
    sent.append(index)
    return dtype_probe.CHOICES.index("bfloat16")

  monkeypatch.setattr(dtype_probe, "process_count", lambda: 2)
  monkeypatch.setattr(dtype_probe, "broadcast_choice", fake_broadcast)
  assert dtype_probe.resolve_dtype("auto", machine["cache"]) == "bfloat16"
  assert sent == [dtype_probe.CHOICES.index("float32")]  # this process offered its own
  assert dtype_probe.resolve_dtype("float32", machine["cache"]) == "float32"  # not broadcast
  assert len(sent) == 1


def test_broadcast_on_one_process_is_the_identity():
  assert dtype_probe.broadcast_choice(1) == 1


def test_launch_resolves_auto_before_any_model_is_built(monkeypatch):
  """A config asking for model.dtype='auto' reaches the trainer with a concrete dtype."""
  from helpers import tiny_lm_config
  from rlhf_jax.train import launch
  monkeypatch.setattr(dtype_probe, "resolve_dtype", lambda requested, cache_path=None: "bfloat16")
  config = tiny_lm_config()
  config.model.dtype = "auto"
  launch.resolve_auto_dtype(config)
  assert config.model.dtype == "bfloat16"
  config.model.dtype = "float32"  # a concrete dtype is left alone
  launch.resolve_auto_dtype(config)
  assert config.model.dtype == "float32"
