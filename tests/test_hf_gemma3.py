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
from rlhf_jax.models import hf_import  # noqa: E402
from rlhf_jax.models.safetensors_io import SafetensorsDir, write_safetensors  # noqa: E402

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
