"""The decoder's configuration: one dataclass for every family the one model implements.

The defaults are a Llama-style decoder (RMSNorm, SwiGLU, rotary positions, grouped-query
attention). Each other family is a set of switches on it, all off by default, and an off switch
adds no operation to the traced computation:

  Qwen2     qkv_bias
  Qwen3     qk_norm (and local_layers + sliding_window where the checkpoint uses them)
  Gemma 3   norm_plus_one, sandwich_norms, qk_norm, mlp_activation='gelu_tanh', embed_scale,
            query_pre_attn_scalar, local_layers + sliding_window, rope_local_theta (and the
            soft-caps attn_softcap / final_softcap, which Gemma 2 used and Gemma 3 leaves off)
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

MLP_ACTIVATIONS = ("silu", "gelu_tanh")
SCORE_POOLS = ("last", "mean")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the transformer. Built from `config.model` (a ConfigDict)."""
  vocab_size: int = 8192
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 4
  d_ff: int = 1024
  head_dim: Optional[int] = None  # None or 0: d_model // n_heads
  max_len: int = 512
  rope_theta: float = 10000.0
  # Rotary frequency scaling of long-context checkpoints: "" (none), "linear" or "llama3"
  # (Llama 3.1+); the last three fields are llama3's (low/high frequency factors, the
  # pretraining context length). See rope_frequencies. With local_layers, the global ones only.
  rope_scaling: str = ""
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 has biases on q, k, v
  # RMSNorm over each q and k head (its head_dim), before the rotation (Qwen3, Gemma 3).
  qk_norm: bool = False
  # RMSNorm multiplies by (1 + w), w initialised to 0 (Gemma); else by w, initialised to 1.
  norm_plus_one: bool = False
  # A norm after attention and after the MLP as well, before each residual add (Gemma 2/3).
  sandwich_norms: bool = False
  mlp_activation: str = "silu"  # the gate's: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
  # Embeddings times sqrt(d_model), the factor rounded to the compute dtype (Gemma).
  embed_scale: bool = False
  # Attention scores times query_pre_attn_scalar ** -0.5; 0: head_dim ** -0.5.
  query_pre_attn_scalar: float = 0.0
  attn_softcap: float = 0.0  # > 0: scores -> cap * tanh(scores / cap)
  final_softcap: float = 0.0  # > 0: logits -> cap * tanh(logits / cap)
  # Sliding-window attention: the layers listed in local_layers see only the keys of the
  # `sliding_window` latest slots (the query's own included); the others see every earlier key.
  sliding_window: int = 0
  local_layers: tuple = ()
  rope_local_theta: float = 0.0  # the local layers' rope base, unscaled; 0: as the global ones
  # Low-rank adapters (models/lora.py): rank 0 is none. The projections whose path matches
  # `lora_targets` (e.g. 'layer_0/attn/q', 'layer_3/mlp/down') get W + (alpha / r) A @ B.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: str = r"(attn/(q|k|v|o)|mlp/(gate|up|down))$"
  lora_dropout: float = 0.0  # on the adapter's input, only when a 'dropout' rng is passed
  # With LoRA, vocabulary ids whose (tied) embedding rows train beside the adapters: a chat
  # template's special tokens, untrained rows in a base model that a frozen embedding cannot
  # tell from their near-copies (experiments/real_recipe).
  lora_tokens: tuple = ()
  # '' or 'int8': the base kernels of the targeted projections stored as int8 with a float32
  # scale per output column (models/quant.py), a quarter of their float32 bytes.
  lora_base_quant: str = ""
  dtype: str = "float32"  # compute dtype; params are always float32
  # > 0: the trainers' log-probs, entropy and next-token loss walk the vocabulary in chunks of
  # this many columns (models/chunked.py), never holding [B, T, V] float32 logits; 0: whole.
  vocab_chunk: int = 0
  remat: bool = False
  scan_layers: bool = False
  # A scalar model's (models/heads.ScalarModel) score: its value at the answer's last token
  # ("last", InstructGPT's readout), or the mean of its values over the answer's own tokens
  # ("mean"). Recorded with the RM's run, so every reader of the RM reads it the same way.
  score_pool: str = "last"

  def __post_init__(self):
    # A config read back from JSON holds a list: keep the dataclass hashable (jit's static arg).
    object.__setattr__(self, "local_layers", tuple(int(i) for i in self.local_layers))
    object.__setattr__(self, "lora_tokens", tuple(int(i) for i in self.lora_tokens))
    if self.lora_tokens:
      bad = [i for i in self.lora_tokens if not 0 <= i < self.vocab_size]
      if bad or len(set(self.lora_tokens)) < len(self.lora_tokens) or not self.tie_embeddings:
        raise ValueError(f"lora_tokens={self.lora_tokens}: ids must be distinct, in [0, "
                         f"{self.vocab_size}), and the embeddings tied (the row is the token's "
                         "input and output)")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if not self.head_dim and self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                       "set head_dim explicitly")
    if self.dim_per_head % 2:
      raise ValueError(f"head_dim={self.dim_per_head} must be even for rotary embeddings")
    if self.rope_scaling not in ("", "linear", "llama3"):
      raise ValueError(f"rope_scaling={self.rope_scaling!r} is not supported; supported: '' "
                       "(none), 'linear', 'llama3'")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp_activation={self.mlp_activation!r} is not supported; supported: "
                       f"{', '.join(MLP_ACTIVATIONS)}")
    if self.score_pool not in SCORE_POOLS:
      raise ValueError(f"score_pool={self.score_pool!r} is not supported; supported: "
                       f"{', '.join(SCORE_POOLS)}")
    outside = [i for i in self.local_layers if not 0 <= i < self.n_layers]
    if outside:
      raise ValueError(f"local_layers {outside} are not layers of a {self.n_layers}-layer model")
    if self.lora_rank < 0 or not 0 <= self.lora_dropout < 1:
      raise ValueError(f"lora_rank={self.lora_rank} must be >= 0 and lora_dropout="
                       f"{self.lora_dropout} in [0, 1)")
    if self.lora_base_quant not in ("", "int8"):
      raise ValueError(f"lora_base_quant={self.lora_base_quant!r} is not supported; supported: "
                       "'' (a float base), 'int8'")
    if self.local_layers and self.sliding_window <= 0:
      raise ValueError(f"local_layers={list(self.local_layers)} need a sliding_window > 0")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    """Accepts a ConfigDict / dict; unknown keys are an error naming them."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d.pop("name", None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; known: {sorted(fields)}")
    return cls(**d)

  def param_count(self) -> int:
    """Number of parameters, computed from the shapes (checked against eval_shape in tests)."""
    d, dh, L = self.d_model, self.dim_per_head, self.n_layers
    attn = d * dh * (self.n_heads * 2 + self.n_kv_heads * 2)
    if self.qkv_bias:
      attn += dh * (self.n_heads + 2 * self.n_kv_heads)
    if self.qk_norm:
      attn += 2 * dh
    per_layer = attn + 3 * d * self.d_ff + (4 if self.sandwich_norms else 2) * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return L * per_layer + emb + d

  def flops_per_token(self, seq_len: int, with_logits: bool = True) -> float:
    """Forward matmul FLOPs per token at context `seq_len` (2 FLOPs per multiply-add).

    Per layer: the q, k, v, o projections (2 d Dh (2 H + 2 Hkv)), the gated MLP (2 * 3 d F),
    and attention's two matmuls, q.k and probs.v, over all `seq_len` keys (2 * 2 T H Dh): the
    causal mask is not subtracted, as in PaLM's definition of MFU (6N + 12 L H Dh T), and
    neither is a sliding window (its layers compute every key and mask the far ones). Plus the
    vocabulary projection (2 d V) when `with_logits`. The embedding lookup is a gather, and
    norms, rotary, softmax and the optimizer are not matmuls: none is counted. A train step
    costs 3x this (the backward pass does two matmuls per forward one, for the inputs' and the
    weights' gradients); tests check the count against the matmuls of a traced forward pass.
    """
    d, dh, L = self.d_model, self.dim_per_head, self.n_layers
    proj = 2 * d * dh * (self.n_heads * 2 + self.n_kv_heads * 2)
    mlp = 2 * 3 * d * self.d_ff
    attn = 2 * 2 * seq_len * self.n_heads * dh  # QK^T and PV over the full (masked) length
    head = 2 * d * self.vocab_size if with_logits else 0
    return L * (proj + mlp + attn) + head


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """Rotary inverse frequencies [Dh/2] (float32), with the config's rope scaling applied.

  Computed on the host: they are constants of the model, and long-context checkpoints (linear
  position interpolation; Llama 3.1's "llama3" rule, which slows only the low frequencies and
  blends the band between) change them, not the rotation itself.
  """
  d = config.dim_per_head
  inv = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / d))
  if config.rope_scaling == "linear":
    inv = inv / config.rope_factor
  elif config.rope_scaling == "llama3":
    wavelen = 2 * np.pi / inv
    low_wavelen = config.rope_original_max_len / config.rope_low_freq_factor
    high_wavelen = config.rope_original_max_len / config.rope_high_freq_factor
    smooth = ((config.rope_original_max_len / wavelen - config.rope_low_freq_factor)
              / (config.rope_high_freq_factor - config.rope_low_freq_factor))
    blended = (1 - smooth) * inv / config.rope_factor + smooth * inv
    inv = np.where(wavelen > low_wavelen, inv / config.rope_factor,
                   np.where(wavelen < high_wavelen, inv, blended))
  return inv.astype(np.float32)


def local_rope_frequencies(config: ModelConfig) -> np.ndarray:
  """The local (sliding-window) layers' inverse frequencies [Dh/2]: base rope_local_theta and
  no scaling (Gemma 3 scales only its global layers' rope), or the global ones without it."""
  if not config.rope_local_theta:
    return rope_frequencies(config)
  return rope_frequencies(dataclasses.replace(config, rope_theta=config.rope_local_theta,
                                              rope_scaling=""))
