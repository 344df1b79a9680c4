"""Gemma 3 as a configuration of our one decoder, against transformers' Gemma 3 (no download).

Small randomly initialised Gemma3ForCausalLM / Gemma3ForConditionalGeneration models, saved as
safetensors and imported, must give transformers' logits (float32, relative error <= 1e-4) on
English and Chinese byte ids longer than the sliding window, and our KV-cache sampler must
continue prompts exactly as `transformers.generate` does, well past the window. Every weight is
random (norm offsets too), so a misplaced tensor, a norm without its (1 + w), a wrong rope base
on a local layer or a window off by one changes the numbers.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_models as H  # noqa: E402
from rlhf_jax.models import hf_import, pretrained  # noqa: E402
from rlhf_jax.models.gguf_io import GGUFFile  # noqa: E402
from rlhf_jax.models.safetensors_io import SafetensorsDir, write_safetensors  # noqa: E402
from rlhf_jax.models.transformer import ModelConfig  # noqa: E402

WINDOW = 16
# Local, local, global, local: the global layer is neither first nor last.
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
TEXT = dict(vocab_size=H.V, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
            rms_norm_eps=1e-6, query_pre_attn_scalar=24, sliding_window=WINDOW,
            layer_types=LAYER_TYPES, attn_implementation="eager")
ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
# Each case adds to what the first checks (head_dim 32 != 64 / 4 heads, query_pre_attn_scalar,
# two rope bases, the window): linear rope scaling of the global layers, the final soft-cap and
# an untied head; the language model of the multimodal class beside its vision tower.
CASES = {
    "gemma3": dict(rope_parameters=ROPE),
    "gemma3_scaled": dict(
        rope_parameters={**ROPE, "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                    "rope_theta": 1_000_000.0}},
        final_logit_softcapping=3.0, tie_word_embeddings=False),
    "gemma3_multimodal": dict(rope_parameters=ROPE),
}


def build(case, seed=0):
  text = transformers.Gemma3TextConfig(**{**TEXT, **CASES[case]})
  if case != "gemma3_multimodal":
    return H.randomize(transformers.Gemma3ForCausalLM(text), seed, norm_offset=True)
  vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, image_size=28, patch_size=14)
  config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision,
                                     mm_tokens_per_image=4)
  config.text_config._attn_implementation = "eager"
  return H.randomize(transformers.Gemma3ForConditionalGeneration(config), seed, norm_offset=True)


_IMPORTS = {}


@pytest.fixture
def imports(tmp_path_factory):
  """case -> (HF model, its directory, our ModelConfig, our params), built once per process."""

  def get(case):
    if case not in _IMPORTS:
      model = build(case)
      directory = str(tmp_path_factory.mktemp(case))
      _IMPORTS[case] = (model, directory, *H.save_and_import(model, directory))
    return _IMPORTS[case]
  return get


@pytest.fixture(params=sorted(CASES))
def imported(request, imports):
  return (request.param, *imports(request.param))


def test_config_maps_the_features(imported):
  case, _, _, cfg, _ = imported
  assert (cfg.norm_plus_one, cfg.sandwich_norms, cfg.qk_norm, cfg.embed_scale) == (True,) * 4
  assert cfg.mlp_activation == "gelu_tanh" and cfg.query_pre_attn_scalar == 24
  assert cfg.local_layers == (0, 1, 3) and cfg.sliding_window == WINDOW
  assert (cfg.rope_theta, cfg.rope_local_theta) == (1_000_000.0, 10_000.0)
  assert cfg.dim_per_head == 32 and cfg.n_kv_heads == 2
  assert cfg.rope_scaling == ("linear" if case == "gemma3_scaled" else "")
  assert cfg.final_softcap == (3.0 if case == "gemma3_scaled" else 0.0)
  assert cfg.tie_embeddings == (case != "gemma3_scaled")


@pytest.mark.parametrize("text", [H.ENGLISH, H.CHINESE])
def test_logits_equal_transformers_past_the_window(imported, text):
  _, model, _, cfg, params = imported
  tokens = [H.byte_ids(text)]
  assert len(tokens[0]) > 3 * WINDOW
  assert H.rel_err(H.our_logits(cfg, params, tokens), H.hf_logits(model, tokens)) <= H.REL_TOL


@pytest.mark.parametrize("case", ["gemma3", "gemma3_scaled"])
def test_greedy_generation_matches_transformers_past_the_window(imports, case):
  """24 new tokens after prompts of 13 and 9 ids (left-padded into one batch): every step past
  slot 16 drops keys from the local layers' view, in our cache mask and in transformers'."""
  model, _, cfg, params = imports(case)
  prompts = [H.byte_ids("Once upon a t"), H.byte_ids("从前有")]
  ours = H.our_greedy(cfg, params, prompts, 24)
  for row, prompt in zip(ours, prompts):
    assert row == H.hf_greedy(model, prompt, 24)


def test_multimodal_checkpoint_imports_its_language_model_only(imports, tmp_path):
  """transformers writes the original checkpoints' names (language_model.model.*, vision_tower.*);
  the same tensors under the names of its modules (model.language_model.*, model.vision_tower.*)
  import to the same params. The vision tower is present in both, and left out."""
  _, directory, cfg, params = imports("gemma3_multimodal")
  with open(os.path.join(directory, "config.json")) as f:
    assert json.load(f)["model_type"] == "gemma3"
  source = SafetensorsDir(directory)
  names = source.names()
  assert any(n.startswith("vision_tower.") for n in names)
  assert any(n.startswith("language_model.model.layers.") for n in names)
  renamed = tmp_path / "renamed"
  renamed.mkdir()
  shutil.copy(os.path.join(directory, "config.json"), renamed)
  new_names = {"language_model.model.": "model.language_model.", "vision_tower.":
               "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}

  def rename(n):
    old = next((o for o in new_names if n.startswith(o)), None)
    return new_names[old] + n[len(old):] if old else n
  write_safetensors(str(renamed / "model.safetensors"),
                    [(rename(n), np.asarray(source.get(n))) for n in names])
  cfg2, params2 = hf_import.load_pretrained(str(renamed))
  assert cfg2 == cfg and cfg.vocab_size == H.V and cfg.n_layers == 4
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_attention_soft_cap_equals_transformers_eager_soft_cap(monkeypatch, tmp_path):
  """attn_softcap against transformers' eager attention with its `softcap` argument (what Gemma
  2 passes; transformers' Gemma3Attention leaves the config's attn_logit_softcapping unused, so
  its eager function is called with the cap here)."""
  from transformers.models.gemma3 import modeling_gemma3
  cap = 2.0
  model = H.randomize(transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
      **TEXT, rope_parameters=ROPE, attn_logit_softcapping=cap)), seed=1, norm_offset=True)
  cfg, params = H.save_and_import(model, str(tmp_path / "capped"))
  assert cfg.attn_softcap == cap
  eager = modeling_gemma3.eager_attention_forward
  monkeypatch.setattr(modeling_gemma3, "eager_attention_forward",
                      lambda *a, **kw: eager(*a, **{**kw, "softcap": cap}))
  tokens = [H.byte_ids(H.ENGLISH)]
  ref = H.hf_logits(model, tokens)
  monkeypatch.undo()
  assert H.rel_err(ref, H.hf_logits(model, tokens)) > 1e-3  # the cap binds
  assert H.rel_err(H.our_logits(cfg, params, tokens), ref) <= H.REL_TOL


def test_older_config_keys_give_the_same_model(imports):
  """The Hub's Gemma 3 configs predate rope_parameters and layer_types: rope_theta,
  rope_local_base_freq, rope_scaling and sliding_window_pattern say the same."""
  _, directory, cfg, _ = imports("gemma3_scaled")
  with open(os.path.join(directory, "config.json")) as f:
    hf = json.load(f)
  for key in ("rope_parameters", "layer_types", "_sliding_window_pattern"):
    hf.pop(key, None)
  hf.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=3,
            rope_scaling={"rope_type": "linear", "factor": 4.0}, num_hidden_layers=4)
  fields = hf_import.model_fields(hf)
  # Pattern 3: layers 0, 1 local, 2 global, 3 local, as LAYER_TYPES.
  assert fields["local_layers"] == cfg.local_layers
  assert {k: fields[k] for k in fields} == {k: getattr(cfg, k) for k in fields}


# ---------------------------------------------------------------- the real Gemma 3 270M (GGUF)

# google/gemma-3-270m's published config.json, written out here so that the reference does not
# depend on our reading of the GGUF metadata (layer_types: every 6th layer global).
GEMMA3_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
    num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=32768,
    rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=512,
    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
# llama.cpp's per-layer tensor names -> transformers' (as transformers' own GGUF reader maps them).
GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm"}
# Prompts as vocabulary pieces (the tokenizer is not under test): what Gemma's tokenizer gives
# for "The capital of France is Paris. The capital of Germany is" and its Chinese counterpart
# (France's capital is Paris, Japan's is Tokyo, China's is), each after <bos>.
PROMPTS = {
    "en": (["The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", ".", "▁The", "▁capital",
            "▁of", "▁Germany", "▁is"], "▁Berlin"),
    "zh": (["法国", "的", "首都", "是", "巴黎", "。", "日本", "的", "首都", "是", "东京", "。", "中国",
            "的", "首都", "是"], "北京"),
}


@pytest.fixture(scope="module")
def gemma3_270m():
  """(GGUF path, our ModelConfig, our params, {piece: id}) of the real model; skipped, saying
  how to install it, when its package is absent."""
  try:
    path = pretrained.gemma3_270m_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  cfg, params = hf_import.load_pretrained(path)
  pieces = GGUFFile(path).metadata["tokenizer.ggml.tokens"]
  return path, cfg, params, {p: i for i, p in enumerate(pieces)}


def _reference_model(path):
  """transformers' Gemma3ForCausalLM holding the file's tensors, each dequantised by the gguf
  package (gguf.quants.dequantize); norms less 1, as llama.cpp's converter stored 1 + w
  (transformers' GGUF reader subtracts 1 too)."""
  f = GGUFFile(path)
  state = {"model.embed_tokens.weight": f.get("token_embd.weight"),
           "model.norm.weight": f.get("output_norm.weight") - 1}
  for name in f.names():
    if name.startswith("blk."):
      _, i, kind, _ = name.split(".")
      w = f.get(name)
      state[f"model.layers.{i}.{GGUF_TO_HF[kind]}.weight"] = w - 1 if kind.endswith("norm") else w
  model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**GEMMA3_270M)).eval()
  missing, unexpected = model.load_state_dict(
      {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
  return model


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.xdist_group("gemma3_270m")
def test_real_gemma3_270m_equals_transformers(gemma3_270m):
  """Our import of the GGUF against transformers on the same dequantised weights, and a check
  that needs neither: the model completes each prompt with the capital (the first token after
  "... Germany is" is " Berlin"), which it would not with its norms read as stored."""
  path, cfg, params, vocab = gemma3_270m
  # The preset's shape, eps as the file stores it (float32 1e-6).
  assert cfg == ModelConfig(**{**pretrained.SHAPES["gemma3_270m"], "norm_eps": cfg.norm_eps})
  assert cfg.norm_eps == pytest.approx(1e-6)
  assert cfg.param_count() == 268_098_176  # published with google/gemma-3-270m
  reference = _reference_model(path)
  for pieces, capital in PROMPTS.values():
    tokens = [[2] + [vocab[p] for p in pieces]]  # <bos> = 2
    ours = H.our_logits(cfg, params, tokens)
    assert H.rel_err(ours, H.hf_logits(reference, tokens)) <= H.REL_TOL
    assert int(np.argmax(ours[0, -1])) == vocab[capital]
