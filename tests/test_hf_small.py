"""Small randomly initialised Llama / Qwen2 / Mistral models built with `transformers` (no
download), saved as safetensors and imported: our logits and greedy tokens must equal theirs,
import -> export -> `transformers` load must give identical logits, and a sharded import must put
only each device's shard on that device.

Every parameter is drawn at random (norm scales and biases too, which HF initialises to 1 and 0),
so a tensor mapped to the wrong place or layout changes the logits.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_models as H  # noqa: E402
from rlhf_jax.core import sharding  # noqa: E402
from rlhf_jax.export import hf_export  # noqa: E402
from rlhf_jax.models import hf_import
from rlhf_jax.models.transformer import Transformer  # noqa: E402

V = 256
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0)
# Each case exercises a mapping feature: GQA + untied head; llama3 rope scaling; Qwen2's q/k/v
# biases with tied embeddings; Mistral with head_dim != hidden / heads; linear rope scaling.
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=32, sliding_window=None,
                                                            rope_scaling=dict(rope_type="linear",
                                                                              factor=2.0))),
}
REL_TOL = 1e-4


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def build_hf_model(case, seed=0):
  config_cls, model_cls, extra = CASES[case]
  config = getattr(transformers, config_cls)(**{**BASE, **extra})
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      std = 1.0 if "embed" in name else 0.15  # peaked logits: greedy ties are unlikely
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, std)
  return model


def our_logits(model_config, params, tokens):
  fn = jax.jit(lambda p, t: Transformer(model_config).apply(
      {"params": p}, t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape), jnp.ones_like(t))[0])
  return np.asarray(fn(params, jnp.asarray(tokens)))


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


_IMPORTS = {}  # per process: module fixtures would be rebuilt whenever xdist interleaves


@pytest.fixture
def imports(tmp_path_factory):
  """case -> (case, HF model, its directory, our ModelConfig, our params), built once."""

  def get(case):
    if case not in _IMPORTS:
      model = build_hf_model(case)
      directory = str(tmp_path_factory.mktemp(case))
      model.save_pretrained(directory, safe_serialization=True)
      model_config, params = hf_import.load_pretrained(directory)
      _IMPORTS[case] = (case, model, directory, model_config, params)
    return _IMPORTS[case]
  return get


@pytest.fixture(params=sorted(CASES))
def imported(request, imports):
  return imports(request.param)


def test_imported_config_maps_the_features(imported):
  case, model, _, cfg, _ = imported
  assert cfg.n_kv_heads == 2 and cfg.n_layers == 2 and cfg.vocab_size == V
  assert cfg.tie_embeddings == bool(model.config.tie_word_embeddings)
  assert cfg.qkv_bias == (case == "qwen2")
  assert cfg.rope_scaling == {"llama3_rope": "llama3", "mistral": "linear"}.get(case, "")
  assert cfg.dim_per_head == (32 if case == "mistral" else 16)


def test_logits_equal_transformers(imported):
  _, model, _, cfg, params = imported
  # 200 positions: past llama3's original context (32), so the scaled bands matter.
  tokens = np.random.RandomState(1).randint(0, V, size=(2, 200))
  ref = hf_logits(model, tokens)
  ours = our_logits(cfg, params, tokens)
  assert _rel_err(ours, ref) <= REL_TOL


@pytest.mark.parametrize("text", [H.ENGLISH, H.CHINESE])
def test_logits_on_english_and_chinese_text(imported, text):
  """UTF-8 byte ids of real text (Chinese: three ids >= 128 per character)."""
  _, model, _, cfg, params = imported
  tokens = [H.byte_ids(text)]
  assert _rel_err(our_logits(cfg, params, np.asarray(tokens)), hf_logits(model, tokens)) <= REL_TOL


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2"])  # llama3_rope: as llama's
def test_greedy_24_tokens_of_english_and_chinese_prompts(imports, case):
  """Our KV-cache sampler on a left-padded batch of an English and a Chinese prompt against
  transformers.generate, 24 tokens each."""
  _, model, _, cfg, params = imports(case)
  prompts = [H.byte_ids("Once upon a t"), H.byte_ids("从前有")]
  for row, prompt in zip(H.our_greedy(cfg, params, prompts, 24), prompts):
    assert row == H.hf_greedy(model, prompt, 24)


def test_export_then_transformers_load_gives_identical_logits(imported, tmp_path):
  case, model, _, cfg, params = imported
  out = hf_export.export_pretrained(params, cfg, str(tmp_path / "export"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(reloaded).__name__ == CASES[case][1].replace("Mistral", "Llama")
  tokens = np.random.RandomState(3).randint(0, V, size=(2, 64))
  np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))


def test_sharded_import_places_only_each_shard(imports):
  """fsdp=4 x tensor=2 on the 8 fake devices, scanned layers: every device holds a slice, never
  the whole tensor, and the sharded model computes the same logits. Qwen2: every kind of
  tensor (biases, tied embedding)."""
  _, model, directory, cfg, params = imports("qwen2")
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  scanned_cfg, scanned = hf_import.load_pretrained(directory, mesh=mesh, scan_layers=True)
  gate = scanned["layers"]["block"]["mlp"]["gate"]["kernel"]  # [L, D, F]: embed->fsdp, mlp->tensor
  assert gate.shape == (2, 64, 96)
  for shard in gate.addressable_shards:
    assert shard.data.shape == (2, 16, 48)
  q = scanned["layers"]["block"]["attn"]["q"]["kernel"]  # [L, D, H, Dh]
  assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 2, q.shape[-1])}
  tokens = np.random.RandomState(4).randint(0, V, size=(2, 32))
  with jax.set_mesh(mesh):
    ours = our_logits(scanned_cfg, scanned, tokens)
  assert _rel_err(ours, hf_logits(model, tokens)) <= REL_TOL


def test_export_writes_index_when_sharded(imports, tmp_path):
  _, model, _, cfg, params = imports("llama")
  out = hf_export.export_pretrained(params, cfg, str(tmp_path / "sharded"), max_shard_bytes=40_000,
                                    dtype="bfloat16")
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    index = json.load(f)
  assert len(set(index["weight_map"].values())) > 2
  reloaded_cfg, reloaded = hf_import.load_pretrained(out)
  assert reloaded_cfg == cfg
  a = np.asarray(params["layer_1"]["mlp"]["down"]["kernel"])
  b = np.asarray(reloaded["layer_1"]["mlp"]["down"]["kernel"])
  np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2)  # bfloat16 on disk
