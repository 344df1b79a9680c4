"""Configurations of imported checkpoints: an HF config.json, or a GGUF file's metadata, as
ModelConfig fields (a plain dict, ready for `config.model`).

Families: Llama 2/3/3.1+ (and SmolLM2), Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms, and
its sliding-window layers where the config turns them on), and Gemma 3's text model
(Gemma3ForCausalLM, or the language model of Gemma3ForConditionalGeneration). A feature the
model does not implement (another model type or activation, an o_proj or MLP bias, partial
rotary, yarn/dynamic rope, an unknown layer type, bidirectional attention) is an
`UnsupportedModelError` naming the field, never a model that silently computes something else.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import numpy as np

from rlhf_jax.core.metrics import read_json
from rlhf_jax.models.gguf_io import GGUFError, GGUFFile
from rlhf_jax.models.model_config import ModelConfig, rope_frequencies

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
_LAYER_TYPES = ("full_attention", "sliding_attention")
# What llama.cpp fixes for Gemma 3 instead of writing it into the file (llama-model.cpp):
# every 6th layer global, the local layers' rope base 10000.
_GGUF_GEMMA3_PATTERN = 6
_GGUF_GEMMA3_LOCAL_THETA = 10000.0


class UnsupportedModelError(ValueError):
  """The checkpoint's architecture (or one of its features) is not one this model implements."""


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {directory}: not a Hugging Face checkpoint")
  return read_json(path)


def _rope_fields(rope: Optional[dict], where: str) -> dict:
  """ModelConfig rope-scaling fields from an HF rope dict ('rope_scaling' / 'rope_parameters')."""
  if not rope:
    return {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if rope.get("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedModelError(f"{where}: partial rotary embeddings "
                                f"(partial_rotary_factor={rope['partial_rotary_factor']}) are "
                                "not supported")
  if kind == "default":
    return {}
  if kind == "linear":
    return dict(rope_scaling="linear", rope_factor=float(rope["factor"]))
  if kind == "llama3":
    return dict(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_len=int(rope["original_max_position_embeddings"]))
  raise UnsupportedModelError(f"{where}: rope scaling type {kind!r} is not supported; supported: "
                              "default, 'linear', 'llama3'")


def _local_layers(layer_types, n_layers: int, where: str) -> tuple:
  """The indices of the sliding-window layers of an HF `layer_types` list."""
  if len(layer_types) != n_layers:
    raise ValueError(f"{where}: layer_types has {len(layer_types)} entries for {n_layers} layers")
  unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
  if unknown:
    raise UnsupportedModelError(f"{where}: layer_types {unknown} are not supported; supported: "
                                f"{', '.join(_LAYER_TYPES)}")
  return tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")


def _shape_fields(hf: dict, head_dim_default: Optional[int], max_len_default: int) -> dict:
  """The fields every family has, from config.json's common keys."""
  d, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or head_dim_default or d // n_heads)
  return dict(
      vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["num_hidden_layers"]),
      n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      d_ff=int(hf["intermediate_size"]), head_dim=head_dim if head_dim != d // n_heads else 0,
      max_len=int(hf.get("max_position_embeddings", max_len_default)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def model_fields(hf: dict, where: str = "config.json") -> dict:
  """ModelConfig fields (a plain dict, ready for `config.model`) from an HF config.json dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    arch = (hf.get("architectures") or [None])[0]
    raise UnsupportedModelError(f"{where}: unsupported architecture model_type={model_type!r} "
                                f"({arch}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  if model_type == "gemma3":  # Gemma3ForConditionalGeneration: its language model only
    if not isinstance(hf.get("text_config"), dict):
      raise ValueError(f"{where}: a gemma3 config without a text_config")
    return gemma3_fields(hf["text_config"], f"{where} (text_config)",
                         hf.get("tie_word_embeddings", True))
  if model_type == "gemma3_text":
    return gemma3_fields(hf, where, True)
  return _llama_fields(hf, where)


def _llama_fields(hf: dict, where: str) -> dict:
  """Llama, Mistral, Qwen2 and Qwen3: SwiGLU decoders with RMSNorm w scaling."""
  model_type = hf["model_type"]
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedModelError(f"{where}: hidden_act={act!r} is not supported (SwiGLU: silu)")
  if hf.get("mlp_bias"):
    raise UnsupportedModelError(f"{where}: mlp_bias=true (biases on the MLP) is not supported")
  if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
    raise UnsupportedModelError(f"{where}: attention_bias=true gives o_proj a bias, which is not "
                                "supported (only q/k/v biases, as in Qwen2)")
  fields = _shape_fields(hf, None, 2048)
  window = hf.get("sliding_window")
  if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
    window = None
  if model_type == "qwen3" and window:  # its sliding layers, as its layer_types (or rule) say
    n = fields["n_layers"]
    first = int(hf.get("max_window_layers", n))
    types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                      for i in range(n)]
    local = _local_layers(types, n, where)
    if local:
      fields.update(sliding_window=int(window), local_layers=local)
  elif window and int(window) < fields["max_len"]:
    # Within the window, sliding attention is full attention: cap the length there.
    log.info("%s: sliding_window=%s: max_len capped to it", where, window)
    fields["max_len"] = int(window)
  rope = hf.get("rope_parameters") or hf.get("rope_scaling")
  theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
  fields.update(rope_theta=float(theta), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3")
  fields.update(_rope_fields(rope, where))
  return fields


def _gemma3_rope(hf: dict, where: str) -> dict:
  """(global rope fields, local theta) from either layout of Gemma 3's rope settings:
  transformers 5's rope_parameters per layer type, or rope_theta / rope_local_base_freq /
  rope_scaling."""
  params = hf.get("rope_parameters") or {}
  if "full_attention" in params or "sliding_attention" in params:
    glob = dict(params.get("full_attention") or {})
    loc = dict(params.get("sliding_attention") or {})
  else:
    glob = dict(params or hf.get("rope_scaling") or {})
    loc = {}
  theta = glob.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
  local_theta = loc.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
  if loc.get("rope_type", loc.get("type", "default")) != "default":
    raise UnsupportedModelError(f"{where}: rope_parameters.sliding_attention: rope type "
                                f"{loc.get('rope_type', loc.get('type'))!r} on the local layers "
                                "is not supported (only 'default')")
  fields = dict(rope_theta=float(theta), rope_local_theta=float(local_theta))
  fields.update(_rope_fields(glob, f"{where}: rope_parameters.full_attention"))
  return fields


def gemma3_fields(hf: dict, where: str, tie_default: bool) -> dict:
  """Gemma 3's text model: (1 + w) norms around attention and MLP, q/k norms, GeGLU, scaled
  embeddings, interleaved local (sliding-window) and global layers with their own rope bases."""
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
  if act != "gelu_pytorch_tanh":
    raise UnsupportedModelError(f"{where}: hidden_activation={act!r} is not supported (GeGLU: "
                                "gelu_pytorch_tanh)")
  for key in ("attention_bias", "use_bidirectional_attention"):
    if hf.get(key):
      raise UnsupportedModelError(f"{where}: {key}=true is not supported")
  fields = _shape_fields(hf, 256, 131072)
  n = fields["n_layers"]
  pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
  types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else
                                    "full_attention" for i in range(n)]
  local = _local_layers(types, n, where)
  fields.update(
      tie_embeddings=bool(hf.get("tie_word_embeddings", tie_default)), qk_norm=True,
      norm_plus_one=True, sandwich_norms=True, mlp_activation="gelu_tanh", embed_scale=True,
      query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
      attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
      final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
      sliding_window=int(hf.get("sliding_window") or 4096) if local else 0, local_layers=local)
  fields.update(_gemma3_rope(hf, where))
  return fields


# ---------------------------------------------------------------------------------------- GGUF


def _gguf_rope_fields(f: GGUFFile, arch: str, head_dim: int) -> dict:
  """Rope scaling of a GGUF file: a 'linear' type, or llama3's as a per-frequency factor table."""
  meta = f.metadata
  kind = meta.get(f"{arch}.rope.scaling.type", "none")
  if kind == "linear":
    return dict(rope_scaling="linear", rope_factor=float(meta[f"{arch}.rope.scaling.factor"]))
  if kind not in ("none", ""):
    raise UnsupportedModelError(f"{f.path}: {arch}.rope.scaling.type: rope scaling type {kind!r} "
                                "is not supported")
  if "rope_freqs.weight" not in f:
    return {}
  # llama.cpp stores Llama 3.1's scaling as the factor each frequency is divided by. GGUF keeps
  # no low/high factors, so try Meta's published ones and accept them only if they reproduce it.
  factors = f.get("rope_freqs.weight").reshape(-1)
  theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
  base = ModelConfig(d_model=head_dim, n_heads=1, n_kv_heads=1, rope_theta=theta)
  for orig in (8192, int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))):
    fields = dict(rope_scaling="llama3", rope_factor=float(factors.max()),
                  rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=orig)
    plain = rope_frequencies(base)
    scaled = rope_frequencies(dataclasses.replace(base, **fields))
    if np.allclose(plain / scaled, factors, rtol=1e-4):
      return fields
  raise UnsupportedModelError(f"{f.path}: tensor 'rope_freqs.weight' holds rope factors that "
                              "are not Llama 3.1's rule; such scaling is not supported")


def _gguf_gemma3_fields(f: GGUFFile, fields: dict) -> dict:
  """Gemma 3's switches, from its metadata where llama.cpp writes them, else llama.cpp's own
  fixed values (the 6-layer pattern, local rope base 10000, its query scale rule)."""
  meta, n = f.metadata, fields["n_layers"]
  pattern = meta.get("gemma3.attention.sliding_window_pattern", _GGUF_GEMMA3_PATTERN)
  if isinstance(pattern, (list, np.ndarray)):  # one flag per layer: true = sliding window
    local = tuple(i for i, flag in enumerate(pattern) if flag)
  else:
    local = tuple(i for i in range(n) if (i + 1) % int(pattern))
  window = meta.get("gemma3.attention.sliding_window")
  if local and not window:
    raise GGUFError(f"{f.path}: metadata key gemma3.attention.sliding_window is missing")
  head_dim = fields["head_dim"] or fields["d_model"] // fields["n_heads"]
  if "gemma3.attention.scale" in meta:
    scalar = float(meta["gemma3.attention.scale"]) ** -2
  else:  # llama.cpp: d_model / n_heads for the 62-layer 27B model, else head_dim
    scalar = fields["d_model"] / fields["n_heads"] if n == 62 else head_dim
  return dict(
      norm_plus_one=True, sandwich_norms=True, qk_norm=True, mlp_activation="gelu_tanh",
      embed_scale=True, query_pre_attn_scalar=float(scalar),
      attn_softcap=float(meta.get("gemma3.attn_logit_softcapping", 0.0)),
      final_softcap=float(meta.get("gemma3.final_logit_softcapping", 0.0)),
      sliding_window=int(window) if local else 0, local_layers=local,
      rope_local_theta=_GGUF_GEMMA3_LOCAL_THETA)


def gguf_model_fields(f: GGUFFile) -> dict:
  """ModelConfig fields from a GGUF file's metadata (and which tensors it has)."""
  meta = f.metadata
  arch = meta.get("general.architecture")
  if arch not in SUPPORTED_GGUF_ARCHS:
    raise UnsupportedModelError(f"{f.path}: unsupported architecture {arch!r}; supported: "
                                f"{', '.join(SUPPORTED_GGUF_ARCHS)}")

  def get(key, default=None):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
      raise GGUFError(f"{f.path}: metadata key {arch}.{key} is missing")
    return value

  d, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = int(get("attention.key_length", d // n_heads))
  rot = int(get("rope.dimension_count", head_dim))
  if rot != head_dim:
    raise UnsupportedModelError(f"{f.path}: partial rotary embeddings ({rot} of {head_dim} dims) "
                                "are not supported")
  tokens = meta.get("tokenizer.ggml.tokens")
  vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else
                                             f.shape("token_embd.weight")[0])
  fields = dict(
      vocab_size=int(vocab), d_model=d, n_layers=int(get("block_count")), n_heads=n_heads,
      n_kv_heads=int(get("attention.head_count_kv", n_heads)),
      d_ff=int(get("feed_forward_length")), head_dim=head_dim if head_dim != d // n_heads else 0,
      max_len=int(get("context_length", 2048)), rope_theta=float(get("rope.freq_base", 10000.0)),
      norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in f, qkv_bias="blk.0.attn_q.bias" in f,
      qk_norm="blk.0.attn_q_norm.weight" in f)
  if arch == "gemma3":
    fields.update(_gguf_gemma3_fields(f, fields))
  fields.update(_gguf_rope_fields(f, arch, head_dim))
  return fields
