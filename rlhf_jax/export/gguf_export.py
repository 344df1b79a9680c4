"""Writing a policy as a GGUF file (llama.cpp's format), with its tokenizer and chat template.

  write_gguf(params, model_config, "policy.gguf", tokenizer=tok, dtype="float16")

Architectures: 'llama' (no q/k/v biases) or 'qwen2' (with them), the two that
`hf_export.hf_config` writes too; a model with Gemma 3 or Qwen3 features (q/k norms, sandwich
norms, soft-capping, sliding windows, GeGLU) or Llama 3.1 rope scaling is refused with an error
rather than written as a file llama.cpp would run wrongly.

Tensors: llama.cpp names (token_embd, blk.N.attn_q, ..., output_norm, output) in `dtype`:
float32, float16 or bfloat16. No quantised types are written (Q8_0, Q4_K, ...: run llama.cpp's
`llama-quantize` on the file); one-dimensional tensors (norm weights, biases) stay float32, as
llama.cpp's own converter keeps them. For 'llama', the rows of each q and k head are permuted
from HF's rotate-half order to the interleaved pairs llama.cpp's 'llama' rope rotates (the
inverse of what rlhf_jax.models.hf_import undoes on import); 'qwen2' keeps HF's order.

Tokenizer metadata: our sentencepiece tokenizer as tokenizer.ggml.model 'llama' (pieces, scores,
token types, no space prefix, no automatic BOS) with the chat template of rlhf_jax.text.hf_files;
an imported model's tokenizer is copied from its GGUF file's metadata, or, from an HF directory,
written as 'gpt2' byte-level BPE (tokens and merges of its tokenizer.json).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from rlhf_jax.export import hf_export
from rlhf_jax.models.gguf_io import GGUFFile
from rlhf_jax.models.transformer import ModelConfig
from rlhf_jax.text import hf_files
from rlhf_jax.text.tokenizer import SPECIAL_TOKENS, Tokenizer

GGUF_DTYPES = ("float32", "float16", "bfloat16")

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
  """llama.cpp's name of an HF tensor name."""
  if hf_name in _GLOBAL:
    return _GLOBAL[hf_name]
  _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
  if rest not in _LAYER:
    raise ValueError(f"tensor {hf_name} has no GGUF counterpart in the llama/qwen2 layout")
  return f"blk.{i}.{_LAYER[rest]}"


def check_exportable(c: ModelConfig) -> None:
  """ValueError naming what a GGUF 'llama'/'qwen2' file cannot express."""
  unsupported = [name for name, on in (
      ("qk_norm", c.qk_norm), ("norm_plus_one", c.norm_plus_one),
      ("sandwich_norms", c.sandwich_norms), ("embed_scale", c.embed_scale),
      ("mlp_activation != silu", c.mlp_activation != "silu"),
      ("attn_softcap", c.attn_softcap), ("final_softcap", c.final_softcap),
      ("sliding_window", c.sliding_window), ("query_pre_attn_scalar", c.query_pre_attn_scalar),
      ("rope_scaling=llama3", c.rope_scaling == "llama3")) if on]
  if unsupported:
    raise ValueError(f"GGUF export writes llama/qwen2 models only; this model uses "
                     f"{', '.join(unsupported)}: export it with hf_export (safetensors) instead")


def _architecture(writer, c: ModelConfig, name: str) -> None:
  writer.add_name(name)
  writer.add_context_length(c.max_len)
  writer.add_embedding_length(c.d_model)
  writer.add_block_count(c.n_layers)
  writer.add_feed_forward_length(c.d_ff)
  writer.add_head_count(c.n_heads)
  writer.add_head_count_kv(c.n_kv_heads)
  writer.add_key_length(c.dim_per_head)
  writer.add_value_length(c.dim_per_head)
  writer.add_rope_dimension_count(c.dim_per_head)
  writer.add_rope_freq_base(float(c.rope_theta))
  writer.add_layer_norm_rms_eps(float(c.norm_eps))
  writer.add_vocab_size(c.vocab_size)
  if c.rope_scaling == "linear":
    import gguf
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(c.rope_factor))


def gguf_tensors(params, c: ModelConfig, dtype: str, arch: str):
  """Yields (GGUF name, array, ggml type): HF tensors renamed, permuted for 'llama', cast."""
  import gguf
  import ml_dtypes
  types = {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16,
           "bfloat16": gguf.GGMLQuantizationType.BF16}
  heads = {"attn_q.weight": c.n_heads, "attn_k.weight": c.n_kv_heads}
  for hf_name, w in hf_export.hf_tensors(params, "float32"):
    name = gguf_name(hf_name)
    kind = name.split(".", 2)[-1]
    if arch == "llama" and kind in heads:  # [H * Dh, D]: rotate-half -> interleaved pairs
      w = w.reshape(heads[kind], 2, -1, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)
    if w.ndim == 1 or dtype == "float32":
      yield name, np.ascontiguousarray(w, np.float32), types["float32"]
    elif dtype == "float16":
      yield name, np.ascontiguousarray(w, np.float16), types["float16"]
    else:  # the writer takes bf16 as raw uint16 words
      bits = np.ascontiguousarray(w.astype(ml_dtypes.bfloat16)).view(np.uint16)
      yield name, bits, types["bfloat16"]


def write_gguf(params, model_config: ModelConfig, path: str, *, tokenizer=None,
               dtype: str = "float32", name: str = "rlhf_jax policy") -> str:
  """Writes the GGUF file of the module docstring; returns its path."""
  import gguf
  if dtype not in GGUF_DTYPES:
    raise ValueError(f"GGUF dtype {dtype!r} is not one of {list(GGUF_DTYPES)} (quantise the "
                     "float16 file with llama.cpp's llama-quantize for Q8_0, Q4_K, ...)")
  check_exportable(model_config)
  arch = "qwen2" if model_config.qkv_bias else "llama"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = gguf.GGUFWriter(path + ".tmp", arch)
  _architecture(writer, model_config, name)
  writer.add_file_type({"float32": 0, "float16": 1, "bfloat16": 32}[dtype])
  if tokenizer is not None:
    write_tokenizer_metadata(writer, tokenizer)
  for tensor_name, array, ggml_type in gguf_tensors(params, model_config, dtype, arch):
    writer.add_tensor(tensor_name, array, raw_dtype=ggml_type)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(path + ".tmp", path)
  return path


# ---------------------------------------------------------------------------------- tokenizer


def write_tokenizer_metadata(writer, tokenizer) -> None:
  """tokenizer.* keys for our sentencepiece tokenizer or an imported model's tokenizer."""
  if isinstance(tokenizer, Tokenizer):
    _sentencepiece_metadata(writer, tokenizer)
    return
  source = getattr(tokenizer, "path", "") or ""
  if source.endswith(".gguf"):
    _copy_gguf_tokenizer(writer, GGUFFile(source))
    return
  directory = os.path.dirname(source) if source.endswith(".json") else source
  _bpe_metadata(writer, tokenizer, os.path.join(directory, "tokenizer.json"))


def _sentencepiece_metadata(writer, tok: Tokenizer) -> None:
  import gguf
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  kinds = gguf.TokenType
  tokens, scores, types = [], [], []
  for i in range(sp.vocab_size()):
    piece = sp.id_to_piece(i)
    tokens.append(piece)
    scores.append(float(sp.get_score(i)))
    types.append(kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i)
                 else kinds.USER_DEFINED if piece in SPECIAL_TOKENS
                 else kinds.BYTE if sp.is_byte(i) else kinds.NORMAL)
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_scores(scores)
  writer.add_token_types(types)
  writer.add_bos_token_id(tok.bos_id)
  writer.add_eos_token_id(tok.eos_id)
  writer.add_unk_token_id(tok.unk_id)
  writer.add_pad_token_id(tok.pad_id)
  writer.add_eot_token_id(tok.end_id)
  writer.add_add_bos_token(False)
  writer.add_add_eos_token(False)
  writer.add_bool("tokenizer.ggml.add_space_prefix", False)
  writer.add_chat_template(hf_files.chat_template_jinja())


def _copy_gguf_tokenizer(writer, source: GGUFFile) -> None:
  """Every tokenizer.* key of the imported model's own GGUF file, as it is."""
  import gguf
  meta = source.metadata
  for key, value in meta.items():
    if not key.startswith("tokenizer."):
      continue
    if key == "tokenizer.ggml.scores":
      writer.add_array(key, [float(v) for v in value])
    elif key == "tokenizer.ggml.token_type":
      writer.add_array(key, [int(v) for v in value])
    elif isinstance(value, (list, tuple, np.ndarray)):
      writer.add_array(key, list(value))
    elif isinstance(value, bool):
      writer.add_bool(key, value)
    elif isinstance(value, str):
      writer.add_string(key, value)
    elif isinstance(value, (int, np.integer)):
      writer.add_uint32(key, int(value))
    else:
      writer.add_key_value(key, value, gguf.GGUFValueType.FLOAT32)


def _bpe_metadata(writer, tokenizer, tokenizer_json: str) -> None:
  """'gpt2' byte-level BPE from an HF tokenizer.json (tokens, merges, special tokens)."""
  import gguf
  with open(tokenizer_json, encoding="utf-8") as f:
    spec = json.load(f)
  model = spec["model"]
  if model.get("type") != "BPE":
    raise ValueError(f"{tokenizer_json}: a {model.get('type')} tokenizer cannot be written to "
                     "GGUF here (byte-level BPE only)")
  vocab = dict(model["vocab"])
  for added in spec.get("added_tokens", []):
    vocab[added["content"]] = added["id"]
  size = max(vocab.values()) + 1
  tokens = [f"[PAD{i}]" for i in range(size)]
  for token, i in vocab.items():
    tokens[i] = token
  special = {a["id"] for a in spec.get("added_tokens", []) if a.get("special")}
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                          for i in range(size)])
  writer.add_token_merges(merges)
  writer.add_bos_token_id(tokenizer.bos_id)
  writer.add_eos_token_id(tokenizer.eos_id)
  writer.add_pad_token_id(tokenizer.pad_id)
  writer.add_chat_template(tokenizer.chat_template)


def read_tensors(path: str, names: Optional[list] = None) -> dict:
  """{name: float32 array in numpy order} of a GGUF file, via the gguf package's reader."""
  import gguf
  reader = gguf.GGUFReader(path)
  out = {}
  for t in reader.tensors:
    if names is not None and t.name not in names:
      continue
    data = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
      data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    out[t.name] = data.astype(np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
  return out
