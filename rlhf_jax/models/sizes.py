"""Named model sizes, in one place.

`tiny` is for tests (compiles in a second), `small` for the 2-core CPU demo, `w1` is the shape of
the PPO speed workload every peer is compared on, and the real sizes follow published Llama-family
shapes (their shapes and memory are checked with `jax.eval_shape`, nothing is allocated).
"""
from rlhf_jax.models.transformer import ModelConfig

SIZES = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_len=128),
    "small": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768, max_len=256),
    # The PPO/SFT/RM speed workloads W1-W3 (see benchmarks/): 4 layers, d 256, SwiGLU 1024.
    "w1": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=1024, max_len=256,
               vocab_size=8192),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2816, max_len=2048,
                 vocab_size=32000),
    # SmolLM2-135M's shape (Llama architecture, tied embeddings).
    "135m": dict(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536, max_len=2048,
                 vocab_size=49152, tie_embeddings=True, rope_theta=100000.0),
    # Llama-3.2-1B's shape.
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192, max_len=2048,
               vocab_size=128256, tie_embeddings=True, rope_theta=500000.0),
    # Llama-2-7B's shape.
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008, max_len=4096,
               vocab_size=32000),
}


def model_config(size: str, **overrides) -> ModelConfig:
  """The ModelConfig of a named size, with field overrides (e.g. vocab_size from a tokenizer)."""
  if size not in SIZES:
    raise ValueError(f"unknown model size {size!r}; known sizes: {sorted(SIZES)}")
  return ModelConfig(**{**SIZES[size], **overrides})
