"""Importing checkpoints: a Hugging Face directory or a GGUF file -> config + params.

  model_config, params = load_pretrained("path/to/hf_dir")             # config.json + safetensors
  model_config, params = load_pretrained("model.gguf", mesh=mesh, rules=rules)

Supported: Llama 2/3/3.1+ (and SmolLM2, which is Llama), Mistral, Qwen2 (q/k/v biases), Qwen3
(q/k norms) and Gemma 3's text model (also the language model of a Gemma3ForConditionalGeneration
checkpoint, whose vision tower is left out), with GQA, tied or untied embeddings, an explicit
head_dim, and rope scaling 'linear' or 'llama3'. The configuration is read by hf_configs.py;
anything else is an `UnsupportedModelError` saying what, never a model that silently computes
something else.

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

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import hf_layout
from rlhf_jax.models.gguf_io import GGUFError, GGUFFile
# The configuration side, imported here for the callers of this module's public names.
from rlhf_jax.models.hf_configs import (UnsupportedModelError, gguf_model_fields, model_fields,
                                        read_hf_config)
from rlhf_jax.models.safetensors_io import SafetensorsDir, SafetensorsError
from rlhf_jax.models.transformer import ModelConfig, Transformer

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that hold nothing the model needs (recomputed rope tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

__all__ = ["load_pretrained", "load_params", "load_params_like", "model_fields",
           "gguf_model_fields", "read_hf_config", "is_pretrained_path", "open_checkpoint",
           "UnsupportedModelError", "WeightShapeError", "SafetensorsError", "GGUFError"]


class WeightShapeError(ValueError):
  """A tensor is missing, unexpected, or of another shape than the config implies."""


def is_pretrained_path(path: str) -> bool:
  """A GGUF file, or a directory holding a Hugging Face config.json."""
  return bool(path) and (path.endswith(".gguf") or
                         os.path.isfile(os.path.join(path, "config.json")))


# ------------------------------------------------------------------------------ tensor sources


class _GGUFSource:
  """A GGUF file seen through HF tensor names and layouts.

  llama.cpp's 'llama' architecture rotates interleaved pairs (2i, 2i+1), so its converter
  permuted the rows of every q and k projection head from HF's (i, i + Dh/2) order; this undoes
  that permutation. Qwen2/3 and Gemma 3 files keep HF's order (llama.cpp runs them in NEOX mode).

  Gemma 3: llama.cpp's converter stores every RMSNorm weight as 1 + w (its norms multiply by the
  weight), so w is recovered here by subtracting 1: the norms' values, about 1 + w in the file,
  would otherwise be doubled to 2 + w by the model (transformers' GGUF reader does the same).
  """
  _NAMES = {
      "input_layernorm.weight": "attn_norm.weight",
      "post_attention_layernorm.weight": "ffn_norm.weight",
      "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
      "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
      "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
      "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
      "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
      "self_attn.q_norm.weight": "attn_q_norm.weight",
      "self_attn.k_norm.weight": "attn_k_norm.weight",
  }
  # Gemma 3's four norms per layer: ffn_norm is then the MLP's input norm.
  _GEMMA3 = {
      "post_attention_layernorm.weight": "post_attention_norm.weight",
      "pre_feedforward_layernorm.weight": "ffn_norm.weight",
      "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
  }
  _GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}

  def __init__(self, f: GGUFFile, fields: dict):
    self.file, self.path = f, f.path
    self.arch = f.metadata["general.architecture"]
    self.heads = {"attn_q": fields["n_heads"], "attn_k": fields["n_kv_heads"]}
    self.layer_names = {**self._NAMES, **(self._GEMMA3 if self.arch == "gemma3" else {})}

  def gguf_name(self, hf_name: str) -> str:
    if hf_name in self._GLOBAL:
      return self._GLOBAL[hf_name]
    _, _, i, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    if rest not in self.layer_names:
      return hf_name  # no GGUF counterpart: reported missing
    return f"blk.{i}.{self.layer_names[rest]}"

  def names(self) -> list[str]:
    """Every tensor of the file under its HF name (unknown ones under their GGUF name)."""
    back = {v: k for k, v in self._GLOBAL.items()}
    per_layer = {v: k for k, v in self.layer_names.items()}
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
    if self.arch == "gemma3" and name.endswith("norm.weight"):
      w = w - np.float32(1.0)
    return w


class _TextPart:
  """The language model of a multimodal checkpoint, seen under a causal LM's tensor names.

  Gemma3ForConditionalGeneration keeps its text model under `model.language_model.` (as
  transformers 5 saves it; `language_model.model.` in the original checkpoints) beside a vision
  tower and projector, which are not imported and so are left out of `names()`.
  """
  _LAYOUTS = (("model.language_model.", "lm_head.weight"),
              ("language_model.model.", "language_model.lm_head.weight"))
  _VISION = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
             "multi_modal_projector.")

  def __init__(self, source):
    self.source = source
    names = source.names()
    self.prefix, self.head = next(
        ((p, h) for p, h in self._LAYOUTS if any(n.startswith(p) for n in names)),
        self._LAYOUTS[0])

  def inner(self, hf_name: str) -> str:
    if hf_name == "lm_head.weight":
      return self.head
    return self.prefix + hf_name[len("model."):]

  def names(self) -> list[str]:
    out = []
    for n in self.source.names():
      if n.startswith(self._VISION):
        continue
      out.append("lm_head.weight" if n == self.head else
                 "model." + n[len(self.prefix):] if n.startswith(self.prefix) else n)
    return out

  def __contains__(self, hf_name: str) -> bool:
    return self.inner(hf_name) in self.source

  def shape(self, hf_name: str) -> tuple[int, ...]:
    return self.source.shape(self.inner(hf_name))

  def get(self, hf_name: str) -> np.ndarray:
    return self.source.get(self.inner(hf_name))


def open_checkpoint(path: str):
  """(ModelConfig fields, tensor source) of an HF directory or a GGUF file."""
  if path.endswith(".gguf") or os.path.isfile(path):
    f = GGUFFile(path)
    fields = gguf_model_fields(f)
    return fields, _GGUFSource(f, fields)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}: expected a Hugging Face directory "
                            "(config.json + *.safetensors) or a .gguf file")
  hf = read_hf_config(path)
  fields = model_fields(hf, os.path.join(path, "config.json"))
  source = SafetensorsDir(path)
  return fields, (_TextPart(source) if hf.get("model_type") == "gemma3" else source)


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
