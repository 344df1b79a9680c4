"""Importing Llama-family checkpoints: a Hugging Face directory or a GGUF file -> config + params.

  model_config, params = load_pretrained("path/to/hf_dir")             # config.json + safetensors
  model_config, params = load_pretrained("model.gguf", mesh=mesh, rules=rules)

Supported: Llama 2/3/3.1+ (and SmolLM2, which is Llama), Mistral and Qwen2 (q/k/v biases), with
GQA, tied or untied embeddings, an explicit head_dim, and rope scaling 'linear' or 'llama3'.
Anything else (another model type, an o_proj or MLP bias, partial rotary, yarn/dynamic rope) is
an `UnsupportedModelError` saying what, never a model that silently computes something else.

Sharded without a second full copy: the abstract param tree (`jax.eval_shape` of init) gives
every parameter its logical axes, `sharding.logical_shardings` turns them into NamedShardings
for the mesh, and `jax.make_array_from_callback` asks, per addressable device, for exactly that
device's slice. Safetensors tensors are memory-mapped views (hf_layout's transposes are views
too), so only each shard is copied on the host and only each shard reaches its device; a
multi-host run reads only its own devices' shards. GGUF tensors are dequantised one at a time.

Checks before any array is placed: every tensor the model needs is present with the shape the
config implies, and every tensor in the checkpoint is used (an unused one means the checkpoint
holds an architecture feature the model lacks). Failures are ValueErrors naming the tensor.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import hf_layout
from rlhf_jax.models.gguf_io import GGUFError, GGUFFile
from rlhf_jax.models.safetensors_io import SafetensorsDir, SafetensorsError
from rlhf_jax.models.transformer import ModelConfig, Transformer, rope_frequencies

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")
# Tensors some checkpoints carry that hold nothing the model needs (recomputed rope tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

__all__ = ["load_pretrained", "load_params", "load_params_like", "model_fields",
           "is_pretrained_path", "UnsupportedModelError", "WeightShapeError",
           "SafetensorsError", "GGUFError"]


class UnsupportedModelError(ValueError):
  """The checkpoint's architecture (or one of its features) is not one this model implements."""


class WeightShapeError(ValueError):
  """A tensor is missing, unexpected, or of another shape than the config implies."""


# ------------------------------------------------------------------------------ configurations


def is_pretrained_path(path: str) -> bool:
  """A GGUF file, or a directory holding a Hugging Face config.json."""
  return bool(path) and (path.endswith(".gguf") or
                         os.path.isfile(os.path.join(path, "config.json")))


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in {directory}: not a Hugging Face checkpoint")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e})") from None


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


def model_fields(hf: dict, where: str = "config.json") -> dict:
  """ModelConfig fields (a plain dict, ready for `config.model`) from an HF config.json dict."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    arch = (hf.get("architectures") or [None])[0]
    raise UnsupportedModelError(f"{where}: unsupported architecture model_type={model_type!r} "
                                f"({arch}); supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise UnsupportedModelError(f"{where}: hidden_act={act!r} is not supported (SwiGLU: silu)")
  if hf.get("mlp_bias"):
    raise UnsupportedModelError(f"{where}: mlp_bias=true (biases on the MLP) is not supported")
  if model_type == "llama" and hf.get("attention_bias"):
    raise UnsupportedModelError(f"{where}: attention_bias=true gives o_proj a bias, which is not "
                                "supported (only q/k/v biases, as in Qwen2)")
  d, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or d // n_heads)
  max_len = int(hf.get("max_position_embeddings", 2048))
  window = hf.get("sliding_window")
  if model_type == "qwen2" and not hf.get("use_sliding_window", False):
    window = None
  if window and int(window) < max_len:
    # Within the window, sliding attention is full attention: cap the length there.
    log.info("%s: sliding_window=%s: max_len capped to it", where, window)
    max_len = int(window)
  rope = hf.get("rope_parameters") or hf.get("rope_scaling")
  theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
  fields = dict(
      vocab_size=int(hf["vocab_size"]), d_model=d, n_layers=int(hf["num_hidden_layers"]),
      n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      d_ff=int(hf["intermediate_size"]), head_dim=head_dim if head_dim != d // n_heads else 0,
      max_len=max_len, rope_theta=float(theta), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2")
  fields.update(_rope_fields(rope, where))
  return fields


def _gguf_rope_fields(f: GGUFFile, arch: str, head_dim: int) -> dict:
  """Rope scaling of a GGUF file: a 'linear' type, or llama3's as a per-frequency factor table."""
  meta = f.metadata
  kind = meta.get(f"{arch}.rope.scaling.type", "none")
  if kind == "linear":
    return dict(rope_scaling="linear", rope_factor=float(meta[f"{arch}.rope.scaling.factor"]))
  if kind not in ("none", ""):
    raise UnsupportedModelError(f"{f.path}: rope scaling type {kind!r} is not supported")
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
      tie_embeddings="output.weight" not in f, qkv_bias="blk.0.attn_q.bias" in f)
  fields.update(_gguf_rope_fields(f, arch, head_dim))
  return fields


# ------------------------------------------------------------------------------ tensor sources


class _GGUFSource:
  """A GGUF file seen through HF tensor names and layouts.

  llama.cpp's 'llama' architecture rotates interleaved pairs (2i, 2i+1), so its converter
  permuted the rows of every q and k projection head from HF's (i, i + Dh/2) order; this undoes
  that permutation. Qwen2 GGUF files keep HF's order (llama.cpp runs them in NEOX mode).
  """
  _NAMES = {
      "input_layernorm.weight": "attn_norm.weight",
      "post_attention_layernorm.weight": "ffn_norm.weight",
      "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
      "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
      "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
      "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
      "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
  }
  _GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}

  def __init__(self, f: GGUFFile, fields: dict):
    self.file, self.path = f, f.path
    self.arch = f.metadata["general.architecture"]
    self.heads = {"attn_q": fields["n_heads"], "attn_k": fields["n_kv_heads"]}

  def gguf_name(self, hf_name: str) -> str:
    if hf_name in self._GLOBAL:
      return self._GLOBAL[hf_name]
    _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{i}.{self._NAMES[rest]}"

  def names(self) -> list[str]:
    """Every tensor of the file under its HF name (unknown ones under their GGUF name)."""
    back = {v: k for k, v in self._GLOBAL.items()}
    per_layer = {v: k for k, v in self._NAMES.items()}
    out = []
    for n in self.file.names():
      if n in back:
        out.append(back[n])
      elif n.startswith("blk."):
        _, i, rest = n.split(".", 2)
        out.append(f"model.layers.{i}.{per_layer[rest]}" if rest in per_layer else n)
      elif n != "rope_freqs.weight":  # consumed by gguf_model_fields
        out.append(n)
    return out

  def __contains__(self, hf_name: str) -> bool:
    return self.gguf_name(hf_name) in self.file

  def shape(self, hf_name: str) -> tuple[int, ...]:
    return self.file.shape(self.gguf_name(hf_name))

  def get(self, hf_name: str) -> np.ndarray:
    name = self.gguf_name(hf_name)
    w = self.file.get(name)
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    if self.arch == "llama" and kind in self.heads:
      heads = self.heads[kind]
      rest = w.shape[1:]
      w = w.reshape(heads, -1, 2, *rest).swapaxes(1, 2).reshape(w.shape)
    return w


def open_checkpoint(path: str):
  """(ModelConfig fields, tensor source) of an HF directory or a GGUF file."""
  if path.endswith(".gguf") or os.path.isfile(path):
    f = GGUFFile(path)
    fields = gguf_model_fields(f)
    return fields, _GGUFSource(f, fields)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}: expected a Hugging Face directory "
                            "(config.json + *.safetensors) or a .gguf file")
  fields = model_fields(read_hf_config(path), os.path.join(path, "config.json"))
  return fields, SafetensorsDir(path)


# ----------------------------------------------------------------------------------- loading


def _check_tensors(source, leaves: list, where: str) -> None:
  """WeightShapeError for a missing, unused or misshapen tensor (the first one, by name)."""
  expected = {}
  for leaf in leaves:
    shape = hf_layout.hf_shape(leaf.layout, leaf.shape[1:] if leaf.stacked else leaf.shape)
    for name in leaf.hf_names:
      expected[name] = shape
  for name, shape in expected.items():
    if name not in source:
      raise WeightShapeError(f"{where}: tensor {name!r} is missing (the config needs it, "
                             f"shape {shape})")
    got = tuple(source.shape(name))
    if got != shape:
      raise WeightShapeError(f"{where}: tensor {name!r} has shape {got}, but the config implies "
                             f"{shape}")
  tied = "lm_head.weight" not in expected
  for name in source.names():
    if name in expected or name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
      continue
    raise WeightShapeError(f"{where}: tensor {name!r} is not used by this model (an "
                           "architecture feature it lacks, or a config that does not match the "
                           "weights)")


def _place_leaf(source, leaf, sharding) -> jax.Array:
  """One parameter onto its sharding, each device receiving only its slice (float32)."""
  memo: dict[int, np.ndarray] = {}

  def layer(i: int) -> np.ndarray:  # our layout, one layer (a view for safetensors)
    if i not in memo:
      shape = leaf.shape[1:] if leaf.stacked else leaf.shape
      memo[i] = hf_layout.to_ours(leaf.layout, source.get(leaf.hf_names[i]), shape)
    return memo[i]

  def shard(index) -> np.ndarray:
    if not leaf.stacked:
      return np.asarray(layer(0)[index], np.float32)
    rows = range(leaf.shape[0])[index[0]]
    return np.stack([np.asarray(layer(i)[index[1:]], np.float32) for i in rows])

  return jax.make_array_from_callback(leaf.shape, sharding, shard)


def abstract_params(model_config: ModelConfig):
  """Boxed ShapeDtypeStructs of the params (with their logical axis names); nothing allocated."""
  model = Transformer(model_config)
  tokens = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda k: model.init(k, tokens, tokens, jnp.ones_like(tokens)),
                        jax.random.key(0))["params"]


def _place_all(source, target, shardings, where: str):
  """Checks the tensors, then places every leaf of `target` (abstract or concrete, unboxed)
  onto the matching leaf of `shardings`; returns a tree of `target`'s structure."""
  leaves = list(hf_layout.leaves(target))
  _check_tensors(source, leaves, where)
  flat_shardings, treedef = jax.tree.flatten(shardings)
  arrays = [_place_leaf(source, leaf, s) for leaf, s in zip(leaves, flat_shardings)]
  return jax.tree.unflatten(treedef, arrays)


def load_params(source, model_config: ModelConfig, mesh=None, rules=None, where: str = ""):
  """{'embed': ..., 'layer_0': ...} arrays for `model_config` from a tensor source.

  With a mesh, each parameter is placed on the NamedSharding its logical axes map to under
  `rules` (default: rlhf_jax.core.sharding's); without one, on the first local device.
  """
  import flax.linen as nn
  from rlhf_jax.core import sharding as sharding_lib
  abstract = abstract_params(model_config)
  if mesh is None:
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: single, nn.unbox(abstract))
  else:
    shardings = sharding_lib.logical_shardings(abstract, mesh, sharding_lib.axis_rules(rules))
  return _place_all(source, nn.unbox(abstract), shardings, where)


def load_pretrained(path: str, *, mesh=None, rules=None, **overrides) -> tuple[ModelConfig, Any]:
  """(ModelConfig, params) of a checkpoint. `overrides` set ModelConfig fields that do not
  change shapes (dtype, remat, scan_layers, max_len)."""
  fields, source = open_checkpoint(path)
  model_config = ModelConfig(**{**fields, **overrides})
  params = load_params(source, model_config, mesh, rules, where=path)
  log.info("imported %s: %d layers, d_model %d, vocab %d", path, model_config.n_layers,
           model_config.d_model, model_config.vocab_size)
  return model_config, params


def load_params_like(path: str, params_like):
  """The checkpoint's params in the shapes and shardings of `params_like` (a trainer's freshly
  initialised params, without the {'params': ...} wrapper): how `init_from` starts a run from a
  pretrained checkpoint."""
  import flax.linen as nn
  _, source = open_checkpoint(path)
  target = nn.unbox(params_like)
  return _place_all(source, target, jax.tree.map(lambda x: x.sharding, target), path)
