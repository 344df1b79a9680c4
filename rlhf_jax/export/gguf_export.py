"""Writing a policy as a GGUF file (llama.cpp's format), with its tokenizer and chat template.

  write_gguf(params, model_config, "policy.gguf", tokenizer=tok, dtype="float16")

Architectures, as `hf_export.hf_family` names the model: 'llama' (no q/k/v biases), 'qwen2'
(with them), 'qwen3' (q/k norms) and 'gemma3'. Gemma 3 is written as llama.cpp's converter
writes it (norm weights stored as 1 + w, the sliding window, the soft-caps when set, the query
scale when it is not head_dim) plus the per-layer sliding-window flags
(gemma3.attention.sliding_window_pattern, which our importer reads); llama.cpp itself fixes
Gemma 3's pattern (every 6th layer global) and local rope base (10000), so a model whose local
rope base differs is refused, and one whose pattern differs runs correctly only where the flags
are read. Llama 3.1 rope scaling is refused (llama.cpp wants a rope_freqs tensor for it).

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

import os
import re
import tempfile
from typing import Optional

import numpy as np

from rlhf_jax.core.metrics import read_json
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
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
# Gemma 3's four norms per layer (ffn_norm is then the MLP's input norm).
_GEMMA3_LAYER = {
    **_LAYER, "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_GEMMA3_LOCAL_THETA = 10000.0  # llama.cpp's fixed rope base of Gemma 3's local layers
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str, arch: str = "llama") -> str:
  """llama.cpp's name of an HF tensor name."""
  if hf_name in _GLOBAL:
    return _GLOBAL[hf_name]
  _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
  table = _GEMMA3_LAYER if arch == "gemma3" else _LAYER
  if rest not in table:
    raise ValueError(f"tensor {hf_name} has no GGUF counterpart in the {arch} layout")
  return f"blk.{i}.{table[rest]}"


def gguf_arch(c: ModelConfig) -> str:
  """The GGUF architecture of the model (module docstring); ValueError for what a GGUF file
  cannot express."""
  family = hf_export.hf_family(c)  # refuses mixes no class computes
  if c.rope_scaling == "llama3":
    raise ValueError("GGUF export does not write Llama 3.1 rope scaling (rope_scaling=llama3): "
                     "export it with hf_export (safetensors) instead")
  if family == "qwen3" and c.local_layers:
    raise ValueError("GGUF qwen3 files have no sliding-window layers (llama.cpp runs every layer "
                     "with full attention); this model has local_layers: export it with "
                     "hf_export (safetensors) instead")
  if family == "gemma3" and (c.rope_local_theta or c.rope_theta) != _GEMMA3_LOCAL_THETA:
    raise ValueError(f"GGUF Gemma 3 local layers use rope base {_GEMMA3_LOCAL_THETA:g} in "
                     f"llama.cpp; this model's rope_local_theta is {c.rope_local_theta:g}: export "
                     "it with hf_export (safetensors) instead")
  return family


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
  if c.norm_plus_one:
    _gemma3_keys(writer, c)
  if c.rope_scaling == "linear":
    import gguf
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(float(c.rope_factor))


def _gemma3_keys(writer, c: ModelConfig) -> None:
  arch = "gemma3"
  local = set(c.local_layers)
  writer.add_sliding_window(int(c.sliding_window or c.max_len))
  writer.add_array(f"{arch}.attention.sliding_window_pattern",
                   [i in local for i in range(c.n_layers)])
  scalar = c.query_pre_attn_scalar or c.dim_per_head
  if scalar != c.dim_per_head:
    writer.add_float32(f"{arch}.attention.scale", float(scalar) ** -0.5)
  if c.attn_softcap:
    writer.add_float32(f"{arch}.attn_logit_softcapping", float(c.attn_softcap))
  if c.final_softcap:
    writer.add_float32(f"{arch}.final_logit_softcapping", float(c.final_softcap))


def gguf_tensors(params, c: ModelConfig, dtype: str, arch: str):
  """Yields (GGUF name, array, ggml type): HF tensors renamed, permuted for 'llama', cast."""
  import gguf
  import ml_dtypes
  types = {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16,
           "bfloat16": gguf.GGMLQuantizationType.BF16}
  heads = {"attn_q.weight": c.n_heads, "attn_k.weight": c.n_kv_heads}
  for hf_name, w in hf_export.hf_tensors(params, "float32"):
    name = gguf_name(hf_name, arch)
    kind = name.split(".", 2)[-1]
    if arch == "llama" and kind in heads:  # [H * Dh, D]: rotate-half -> interleaved pairs
      w = w.reshape(heads[kind], 2, -1, w.shape[-1]).swapaxes(1, 2).reshape(w.shape)
    if arch == "gemma3" and name.endswith("norm.weight"):  # llama.cpp's norms multiply by 1 + w
      w = w + np.float32(1.0)
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
  arch = gguf_arch(model_config)
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
  if directory and os.path.isfile(os.path.join(directory, "tokenizer.json")):
    _bpe_metadata(writer, tokenizer, os.path.join(directory, "tokenizer.json"))
    return
  with tempfile.TemporaryDirectory() as tmp:  # a tokenizer built in memory: its own files
    tokenizer.save(tmp)
    _bpe_metadata(writer, tokenizer, os.path.join(tmp, "tokenizer.json"))


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
  spec = read_json(tokenizer_json)
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
  if model.get("byte_fallback"):
    _sentencepiece_bpe_metadata(writer, tokenizer, tokens, special, spec)
    return
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


def _sentencepiece_bpe_metadata(writer, tokenizer, tokens, special, spec) -> None:
  """A SentencePiece-style BPE (U+2581 spaces, <0xNN> byte fallback: Gemma's) as GGUF's 'llama'
  model. GGUF keeps no merges for it: pieces merge in score order, so each piece's score is
  minus its id, the order our tokenizer (rlhf_jax.text.hf_tokenizer) ranks its merges in."""
  import gguf
  added = {a["id"] for a in spec.get("added_tokens", []) if not a.get("special")}
  kinds = gguf.TokenType
  byte_piece = re.compile(r"<0x[0-9A-F]{2}>")
  types = [kinds.UNKNOWN if i == tokenizer.unk_id else kinds.CONTROL if i in special
           else kinds.USER_DEFINED if i in added
           else kinds.BYTE if byte_piece.fullmatch(t) else kinds.NORMAL
           for i, t in enumerate(tokens)]
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(tokens)
  writer.add_token_scores([-float(i) for i in range(len(tokens))])
  writer.add_token_types(types)
  writer.add_bos_token_id(tokenizer.bos_id)
  writer.add_eos_token_id(tokenizer.eos_id)
  writer.add_pad_token_id(tokenizer.pad_id)
  if tokenizer.unk_id is not None:
    writer.add_unk_token_id(tokenizer.unk_id)
  writer.add_add_bos_token(False)
  writer.add_add_eos_token(False)
  writer.add_bool("tokenizer.ggml.add_space_prefix", False)
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
