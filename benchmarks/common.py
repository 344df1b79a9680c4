"""What every benchmark shares: the same-run matmul peak, timers, machine facts, the table.

MFU only means something against a peak measured on the same machine in the same run (on a
shared CPU the load moves the absolute numbers by 3x from one minute to the next), so each
benchmark times a square matmul here, in the compute dtype, and divides by it.

No framework is imported at module level: the torch-only peer scripts in benchmarks/peers/
run in their own virtual environment, without JAX, and import this module too.
"""
from __future__ import annotations

import os
import platform
import statistics
import time


def lm_config(size: str, batch: int, seq_len: int, vocab: int, dtype: str, model: str = "",
              lora_rank: int = 0):
  """A next-token trainer's own config for `size` (or a pretrained preset's shape, `model`),
  so a benchmarked step has the real optimizer and defaults; LoRA as the pipeline sets it."""
  from rlhf_jax.config import sections
  from rlhf_jax.config import util as config_util
  arg = config_util.parse_arg("", size=size, steps=1000, batch=batch, seq_len=seq_len, data="")
  config = config_util.base_lm_config(arg)
  if model:
    config.model = sections.pretrained_model_section(model)[0]
  config.model.vocab_size = vocab
  config.model.dtype = dtype
  config.lora = sections.lora_section(lora_rank)
  config.lora.alpha = 2.0 * max(lora_rank, 1)
  config.data.batch_size = batch
  config.data.seq_len = seq_len
  return config


def shape_config(size: str, vocab: int | None = None, **overrides):
  """A ModelConfig: a size preset (its vocabulary, or `vocab`) or a pretrained model's shape
  (gemma3_270m, smollm2_135m: its own vocabulary), random weights either way."""
  from rlhf_jax.models import ModelConfig, model_config, pretrained
  if size in pretrained.SHAPES:
    return ModelConfig(**{**pretrained.SHAPES[size], **overrides})
  return model_config(size, **({"vocab_size": vocab} if vocab else {}), **overrides)


def model_vocab(model: str, vocab: int) -> int:
  """A pretrained preset's vocabulary size, or `vocab` without one."""
  if not model:
    return vocab
  from rlhf_jax.config import sections
  return sections.pretrained_model_section(model)[0].vocab_size


def matmul_flops(n: int) -> float:
  """FLOPs of one [n, n] @ [n, n]: n^3 multiply-adds, 2 FLOPs each."""
  return 2.0 * n ** 3


def timed(fn) -> float:
  """Seconds one call of fn() takes (fn must block until its result is ready)."""
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def median_seconds(fn, repeats: int, warmup: int = 2) -> tuple[float, list[float]]:
  """(median, all samples) of `repeats` timed calls after `warmup` untimed ones."""
  for _ in range(warmup):
    fn()
  times = [timed(fn) for _ in range(repeats)]
  return statistics.median(times), times


def jax_peak_matmuls(dtype: str, n: int) -> dict:
  """{form: no-argument callable running one jitted [n, n] @ [n, n] in `dtype`}, compiled.

  Default precision, inputs already on the device: what XLA reaches on a large, well-shaped
  matmul, the fair ceiling for the matmuls a model step is made of. A low-precision dtype gets
  two forms, float32 output (`preferred_element_type`) and output in the dtype, because on CPUs
  without native bf16 arithmetic (AVX2) XLA runs the second by upcasting to float32, which can
  beat its bf16-input kernel; the peak is the faster form, so MFU never credits a model for a
  slow reference.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dtype)
  b = jnp.asarray(rng.standard_normal((n, n)), dtype)
  forms = {"f32_out": jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))}
  if jnp.dtype(dtype) != jnp.float32:
    forms[f"{jnp.dtype(dtype).name}_out"] = jax.jit(jnp.dot)
  calls = {name: (lambda f=f: f(a, b).block_until_ready()) for name, f in forms.items()}
  for call in calls.values():
    call()  # compile now: a timing must never include a compile
  return calls


def jax_matmul_peak(dtype: str, n: int = 2048, repeats: int = 10) -> dict:
  """The JAX matmul peak in `dtype`: {"flops_per_s" (fastest form), "by_form", "dtype", "n"}."""
  by_form = {name: matmul_flops(n) / median_seconds(call, repeats)[0]
             for name, call in jax_peak_matmuls(dtype, n).items()}
  return {"dtype": dtype, "n": n, "flops_per_s": max(by_form.values()), "by_form": by_form}


def time_torch_matmul(torch, dtype: str, n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of torch.mm on two [n, n] tensors in `dtype` (median of `repeats`)."""
  gen = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=gen).to(getattr(torch, dtype))
  b = torch.randn(n, n, generator=gen).to(getattr(torch, dtype))
  return matmul_flops(n) / median_seconds(lambda: torch.mm(a, b), repeats)[0]


def torch_step_figure(path: str, workload: str, rows: int, seq_len: int) -> dict:
  """{"step_s", "cpu_step_s", "source"} of the plain torch loop (benchmarks/peers/torch_steps.py)
  for `workload` ('w2' or 'w3'), read from its JSON; a file of another benchmark, or a row of
  another shape, is refused so a ratio always compares the same work."""
  import json
  with open(path, encoding="utf-8") as f:
    peer = json.load(f)
  if peer.get("benchmark") != "torch_steps":
    raise ValueError(f"{path}: not a result of benchmarks/peers/torch_steps.py")
  found = [r for r in peer["results"] if r["workload"] == workload]
  if not found:
    raise ValueError(f"{path}: no {workload} result (it ran {[r['workload'] for r in peer['results']]})")
  r = found[0]
  if (r["rows"], r["seq_len"]) != (rows, seq_len):
    raise ValueError(f"{path}: torch's {workload} ran {r['rows']} rows x {r['seq_len']} tokens, "
                     f"this run {rows} x {seq_len}")
  v = peer["versions"]
  return {"step_s": r["step_s"], "cpu_step_s": r["cpu_step_s"],
          "source": f"{path}: torch {v['torch']} / transformers {v['transformers']}, measured "
                    f"{peer['date']} (load {peer['machine']['loadavg_1m_before_after']})"}


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo (platform.processor() is empty on most Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def machine_info() -> dict:
  """Facts that decide how to read a timing: CPU, cores, load now, XLA_FLAGS."""
  return {"platform": platform.platform(), "processor": cpu_name(),
          "cpu_count": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def memory_gib(pid="self") -> dict:
  """{"rss", "peak"}: a process's (this one's by default) resident memory now and its
  high-water mark so far, GiB (Linux /proc/PID/status VmRSS / VmHWM; NaN elsewhere). Read after
  each phase of a step, the high-water mark says which phase set the process's peak."""
  out = {"rss": float("nan"), "peak": float("nan")}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
          out["rss" if key == "VmRSS" else "peak"] = int(value.split()[0]) / 2 ** 20  # kB
  except OSError:
    pass
  return out


def markdown_table(header: list[str], rows: list[list]) -> str:
  """A Markdown table; cells are printed with str()."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def emit(result: dict, json_out: str = "") -> None:
  """Print the benchmark's JSON object on one line (what scripts parse) and, with a path, also
  write it there indented (what RESULTS.md cites)."""
  import json
  print(json.dumps(result))
  write_json(result, json_out)


def write_json(result: dict, path: str) -> None:
  """`result` indented into `path` (nothing when the path is empty); a long benchmark calls it
  after every setting, so a run cut short keeps what it measured."""
  import json
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(result, f, indent=1)
