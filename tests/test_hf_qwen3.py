"""Qwen3 (q/k RMS norms per head, no biases) imported from small random `transformers` models.

Logits on English and Chinese byte ids must equal transformers' (float32, relative error
<= 1e-4), and greedy continuations through our KV-cache sampler must equal `generate`'s. The
second case turns on Qwen3's sliding-window layers (use_sliding_window, the layers from
max_window_layers on), which run past their window here.
"""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_models as H  # noqa: E402

WINDOW = 16
BASE = dict(vocab_size=H.V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=1_000_000.0, attn_implementation="eager")
CASES = {
    "qwen3": dict(tie_word_embeddings=False),
    "qwen3_window": dict(tie_word_embeddings=True, use_sliding_window=True,
                         sliding_window=WINDOW, max_window_layers=1),
}
_IMPORTS = {}


@pytest.fixture(params=sorted(CASES))
def imported(request, tmp_path_factory):
  case = request.param
  if case not in _IMPORTS:
    model = H.randomize(transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(**{**BASE, **CASES[case]})), seed=0)
    _IMPORTS[case] = (case, model, *H.save_and_import(model, str(tmp_path_factory.mktemp(case))))
  return _IMPORTS[case]


def test_config_maps_the_features(imported):
  case, _, cfg, _ = imported
  assert cfg.qk_norm and not cfg.qkv_bias and not cfg.norm_plus_one and not cfg.sandwich_norms
  assert cfg.dim_per_head == 32 and cfg.mlp_activation == "silu"
  windowed = case == "qwen3_window"
  assert cfg.local_layers == ((1, 2) if windowed else ())
  assert cfg.sliding_window == (WINDOW if windowed else 0)
  assert cfg.tie_embeddings == windowed and cfg.max_len == 256


@pytest.mark.parametrize("text", [H.ENGLISH, H.CHINESE])
def test_logits_equal_transformers(imported, text):
  _, model, cfg, params = imported
  tokens = [H.byte_ids(text)]
  assert H.rel_err(H.our_logits(cfg, params, tokens), H.hf_logits(model, tokens)) <= H.REL_TOL


def test_greedy_generation_matches_transformers(imported):
  _, model, cfg, params = imported
  prompts = [H.byte_ids("Once upon a t"), H.byte_ids("从前有")]
  for row, prompt in zip(H.our_greedy(cfg, params, prompts, 24), prompts):
    assert row == H.hf_greedy(model, prompt, 24)
