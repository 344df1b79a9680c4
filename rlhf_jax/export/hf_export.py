"""Exporting params to a Hugging Face checkpoint directory that `transformers` loads as is.

  export_pretrained(params, model_config, "out/", tokenizer=tok)

writes config.json (LlamaForCausalLM; Qwen2ForCausalLM when the model has q/k/v biases;
Qwen3ForCausalLM with q/k norms; Gemma3ForCausalLM for Gemma 3's switches: `hf_family`),
model.safetensors (or shards of at most `max_shard_bytes` plus model.safetensors.index.json),
generation_config.json and, given a tokenizer, the files `AutoTokenizer` needs (`write_tokenizer`):
for our sentencepiece tokenizer a tokenizer.json giving the same ids plus tokenizer.model and a
Jinja chat template reproducing ours (rlhf_jax/text/hf_files.py); for an imported model's
tokenizer its original files when it came from an HF directory, else tokenizer.json rebuilt from
the GGUF vocabulary; so a trained policy can be served by any HF-compatible server.

Params are gathered one tensor at a time (a sharded or multi-host array is assembled on the host
for that tensor only), converted to the HF layout (rlhf_jax.models.hf_layout), and written in
`dtype` (float32 by default: the logits then equal ours; bfloat16 halves the size). In a
multi-process run every process must call this (the gather is collective); process 0 writes.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import ml_dtypes
import numpy as np

from rlhf_jax.models import hf_layout, pretrained
from rlhf_jax.models.safetensors_io import INDEX_NAME, write_safetensors
from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.text import hf_files
from rlhf_jax.text.tokenizer import Tokenizer

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def hf_family(c: ModelConfig) -> str:
  """'gemma3', 'qwen3', 'qwen2' or 'llama': the transformers class whose computation is this
  configuration's. A mix no class computes (e.g. Gemma's norms with Qwen's biases) is a
  ValueError naming the fields, never a config.json that loads as another model."""
  gemma = dict(norm_plus_one=c.norm_plus_one, sandwich_norms=c.sandwich_norms,
               embed_scale=c.embed_scale, qk_norm=c.qk_norm,
               gelu_tanh=c.mlp_activation == "gelu_tanh")
  if c.norm_plus_one:
    off = [k for k, on in gemma.items() if not on] + (["qkv_bias"] if c.qkv_bias else [])
    if off:
      raise ValueError(f"a Gemma 3 model (norm_plus_one) needs every Gemma 3 switch; this one "
                       f"has {', '.join(off)} differing: no transformers class computes it")
    return "gemma3"
  odd = [k for k, on in gemma.items() if on and k != "qk_norm"]
  odd += [k for k in ("attn_softcap", "final_softcap", "query_pre_attn_scalar",
                      "rope_local_theta") if getattr(c, k)]
  if c.qk_norm and c.qkv_bias:
    odd.append("qk_norm with qkv_bias")
  if c.local_layers and not c.qk_norm:
    odd.append("sliding-window layers (Llama / Qwen2 export: full attention only)")
  if odd:
    raise ValueError(f"no transformers class computes this model's {', '.join(odd)}")
  return "qwen3" if c.qk_norm else "qwen2" if c.qkv_bias else "llama"


def _layer_types(c: ModelConfig) -> list:
  local = set(c.local_layers)
  return ["sliding_attention" if i in local else "full_attention" for i in range(c.n_layers)]


def _family_keys(c: ModelConfig, family: str) -> dict:
  """config.json keys particular to each family."""
  if family == "gemma3":
    scalar = float(c.query_pre_attn_scalar or c.dim_per_head)  # transformers 5 wants an int
    return dict(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=int(scalar) if scalar.is_integer() else scalar,
        sliding_window=c.sliding_window or c.max_len, layer_types=_layer_types(c),
        rope_local_base_freq=c.rope_local_theta or c.rope_theta,
        attn_logit_softcapping=c.attn_softcap or None,
        final_logit_softcapping=c.final_softcap or None, attention_bias=False,
        rope_parameters={
            "full_attention": {"rope_theta": c.rope_theta, **(_rope_scaling(c) or
                                                               {"rope_type": "default"})},
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": c.rope_local_theta or c.rope_theta}})
  if family == "qwen3":
    window = bool(c.local_layers)
    return dict(attention_bias=False, use_sliding_window=window,
                sliding_window=c.sliding_window if window else None,
                max_window_layers=min(c.local_layers) if window else c.n_layers,
                layer_types=_layer_types(c))
  if family == "qwen2":
    return dict(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layers)
  return dict(attention_bias=False, mlp_bias=False, pretraining_tp=1)


_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
                  "qwen3": ("Qwen3ForCausalLM", "qwen3"),
                  "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}


def hf_config(model_config: ModelConfig, tokenizer=None, dtype: str = "float32") -> dict:
  """config.json contents for the family `hf_family` names. Rope settings use the `rope_theta`
  + `rope_scaling` keys, which both transformers 4.x and 5.x read (Gemma 3 adds its per-layer
  -type `rope_parameters`, which 5.x reads first)."""
  c = model_config
  family = hf_family(c)
  architecture, model_type = _ARCHITECTURES[family]
  config = {
      "architectures": [architecture], "model_type": model_type,
      "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
      "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
      "num_key_value_heads": c.n_kv_heads, "head_dim": c.dim_per_head,
      "max_position_embeddings": c.max_len, "rms_norm_eps": c.norm_eps,
      "rope_theta": c.rope_theta, "rope_scaling": _rope_scaling(c),
      "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu",
      "initializer_range": 0.02, "use_cache": True, "torch_dtype": dtype,
  }
  if family == "gemma3":
    config["hidden_act"] = "gelu_pytorch_tanh"
  config.update(_family_keys(c, family))
  if tokenizer is not None:
    config.update(bos_token_id=int(tokenizer.bos_id), eos_token_id=int(tokenizer.eos_id),
                  pad_token_id=int(tokenizer.pad_id))
  return config


def _rope_scaling(c: ModelConfig) -> Optional[dict]:
  if c.rope_scaling == "linear":
    return {"rope_type": "linear", "factor": c.rope_factor}
  if c.rope_scaling == "llama3":
    return {"rope_type": "llama3", "factor": c.rope_factor,
            "low_freq_factor": c.rope_low_freq_factor,
            "high_freq_factor": c.rope_high_freq_factor,
            "original_max_position_embeddings": c.rope_original_max_len}
  return None


def _host(x) -> np.ndarray:
  """The whole array on this host (a collective gather when it spans processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def hf_tensors(params, dtype: str = "float32"):
  """Yields (HF name, array in the HF layout) one tensor at a time."""
  np_dtype = DTYPES[dtype]
  import flax.linen as nn
  tree = nn.unbox(params)
  flat = jax.tree.leaves(tree["params"] if set(tree) == {"params"} else tree)
  for leaf, value in zip(hf_layout.leaves(tree), flat):
    host = _host(value).astype(np.float32)
    layers = host if leaf.stacked else host[None]
    for name, layer in zip(leaf.hf_names, layers):
      yield name, hf_layout.to_hf(leaf.layout, layer).astype(np_dtype)


def export_pretrained(params, model_config: ModelConfig, directory: str, *, tokenizer=None,
                      dtype: str = "float32", max_shard_bytes: int = 5 << 30) -> str:
  """Writes the checkpoint directory; returns its path. See the module docstring."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(directory, exist_ok=True)
  written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
  shard: list = []
  size = 0

  def flush():
    nonlocal shard, size
    if shard:  # full shards go to disk as soon as they fill: bounded host memory
      tmp = os.path.join(directory, f"part-{len(written):05d}.tmp.safetensors")
      write_safetensors(tmp, shard, metadata={"format": "pt"})
      written.append((tmp, [name for name, _ in shard]))
    shard, size = [], 0

  for name, array in hf_tensors(params, dtype):  # every process gathers; one writes
    if not writer:
      continue
    if shard and size + array.nbytes > max_shard_bytes:
      flush()
    shard.append((name, array))
    size += array.nbytes
  if not writer:
    return directory
  flush()
  _name_shards(directory, written)
  _write_json(os.path.join(directory, "config.json"), hf_config(model_config, tokenizer, dtype))
  generation = {"do_sample": False}
  if tokenizer is not None:
    generation.update(bos_token_id=int(tokenizer.bos_id),
                      eos_token_id=[int(i) for i in tokenizer.stop_ids()],
                      pad_token_id=int(tokenizer.pad_id))
  _write_json(os.path.join(directory, "generation_config.json"), generation)
  if tokenizer is not None:
    write_tokenizer(tokenizer, directory, model_config.max_len)
  return directory


def write_tokenizer(tokenizer, directory: str, max_len: Optional[int] = None) -> None:
  """The tokenizer files of the module docstring, for either kind of tokenizer."""
  os.makedirs(directory, exist_ok=True)
  if isinstance(tokenizer, Tokenizer):
    hf_files.write_tokenizer_files(tokenizer, directory, max_len)
    return
  source = pretrained.resolve(tokenizer.path) if getattr(tokenizer, "path", None) else ""
  source_dir = os.path.dirname(source) if source.endswith(".json") else source
  if source_dir and os.path.isdir(source_dir):
    hf_files.copy_tokenizer_files(source_dir, directory)
  elif hasattr(tokenizer, "save"):
    tokenizer.save(directory)
  else:
    raise TypeError(f"cannot export a {type(tokenizer).__name__}: no tokenizer files to write")


def _name_shards(directory: str, written: list) -> None:
  """One file becomes model.safetensors; several get HF's numbered names and an index."""
  index = os.path.join(directory, INDEX_NAME)
  if len(written) == 1:
    os.replace(written[0][0], os.path.join(directory, "model.safetensors"))
    if os.path.exists(index):
      os.remove(index)
    return
  weight_map = {}
  for i, (tmp, names) in enumerate(written):
    name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
    os.replace(tmp, os.path.join(directory, name))
    weight_map.update({n: name for n in names})
  _write_json(index, {"metadata": {}, "weight_map": weight_map})


def _write_json(path: str, data: dict) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=2, ensure_ascii=False)
