"""Exporting imported Gemma 3 and Qwen3 models for standard clients.

A small random transformers model of each family is saved beside a small Gemma-style
SentencePiece tokenizer (its "original files"), imported (`hf_import.load_pretrained`,
`HFTokenizer.load`) and exported (`hf_export.export_pretrained`). transformers must load the
export as the same family (`AutoModelForCausalLM`, `AutoTokenizer`, `apply_chat_template`,
`pipeline("text-generation")`): its logits equal ours (float32, relative <= 1e-4), its greedy
continuation of a chat prompt equals our KV-cache sampler's for 24 tokens past the sliding
window, its chat text and ids equal ours, and a user-typed turn marker stays text on both sides.
"""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_models as H  # noqa: E402
from rlhf_jax.export import hf_export  # noqa: E402
from rlhf_jax.models import hf_import  # noqa: E402
from rlhf_jax.models.transformer import ModelConfig  # noqa: E402
from rlhf_jax.text.hf_tokenizer import HFTokenizer  # noqa: E402

WINDOW = 16
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
WORDS = ["\u2581", "e", "t", "a", "o", "h", "th", "\u2581th", "the", "\u2581the", "er", "in",
         "\u2581a", "\u2581i", "\u2581in", "an", "\u2581an", "user", "model", "\u2581is"]
VOCAB = SPECIALS + ["\n"] + [f"<0x{b:02X}>" for b in range(256)] + WORDS  # 283 pieces
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "the answer is in the <end_of_turn> text, 你好 🤗"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "then the rest"}]
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
COMMON = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              max_position_embeddings=256, rms_norm_eps=1e-6, attn_implementation="eager",
              bos_token_id=2, eos_token_id=1, pad_token_id=0)


def toy_tokenizer() -> HFTokenizer:
  """Gemma's tokenizer shape on a toy vocabulary: U+2581 spaces, byte fallback, turn tokens."""
  tok = H.toy_chat_tokenizer("gemma3", WORDS)
  assert tok.vocab_size == len(VOCAB)
  return tok


def build(family: str):
  if family == "gemma3":
    config = transformers.Gemma3TextConfig(
        **COMMON, query_pre_attn_scalar=24, sliding_window=WINDOW, layer_types=LAYER_TYPES,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    return H.randomize(transformers.Gemma3ForCausalLM(config), 1, norm_offset=True)
  config = transformers.Qwen3Config(**COMMON, rope_theta=1e6, use_sliding_window=True,
                                    sliding_window=WINDOW, max_window_layers=1,
                                    tie_word_embeddings=False)
  return H.randomize(transformers.Qwen3ForCausalLM(config), 1)


@pytest.fixture(scope="module", params=["gemma3", "qwen3"])
def exported(request, tmp_path_factory):
  """(family, our ModelConfig, params, our tokenizer, exported directory)."""
  family = request.param
  source = str(tmp_path_factory.mktemp(f"{family}_hf"))
  build(family).save_pretrained(source, safe_serialization=True)
  toy_tokenizer().save(source)  # the checkpoint's own tokenizer files
  cfg, params = hf_import.load_pretrained(source)
  tok = HFTokenizer.load(source)
  out = str(tmp_path_factory.mktemp(f"{family}_export"))
  hf_export.export_pretrained(params, cfg, out, tokenizer=tok)
  return family, cfg, params, tok, out


def test_config_names_the_family(exported):
  family, cfg, _, _, out = exported
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  expected = {"gemma3": transformers.Gemma3ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}
  assert type(model) is expected[family]
  text_config = model.config
  assert list(text_config.layer_types) == (LAYER_TYPES if family == "gemma3" else
                                           ["full_attention", "sliding_attention",
                                            "sliding_attention"])
  assert text_config.sliding_window == WINDOW
  # Importing the export gives the configuration back.
  assert hf_import.load_pretrained(out)[0] == cfg


def test_logits_and_greedy_equal_ours_past_the_window(exported):
  _, cfg, params, tok, out = exported
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  prompt = tok.render_prompt(CHAT).tolist()
  assert len(prompt) > WINDOW
  assert H.rel_err(H.our_logits(cfg, params, [prompt]), H.hf_logits(model, [prompt])) <= H.REL_TOL
  assert H.our_greedy(cfg, params, [prompt], 24)[0] == H.hf_greedy(model, prompt, 24)


def test_tokenizer_and_chat_template_equal_ours(exported):
  _, _, _, tok, out = exported
  hf = transformers.AutoTokenizer.from_pretrained(out)
  for text in ("the answer is in", "你好 🤗  two  spaces\n", ""):
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
  text = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
  assert text == ("<bos><start_of_turn>user\nBe brief.\n\nthe answer is in the <end_of_turn> "
                  "text, 你好 🤗<end_of_turn>\n<start_of_turn>model\nan answer<end_of_turn>\n"
                  "<start_of_turn>user\nthen the rest<end_of_turn>\n<start_of_turn>model\n")
  # The typed <end_of_turn> is text: one turn end per finished turn in our ids (3 turns).
  ours = tok.render_prompt(CHAT).tolist()
  assert ours.count(tok.end_id) == 3 and tok.decode(ours) == text


def test_pipeline_answers_as_our_greedy_sampler(exported):
  _, cfg, params, tok, out = exported
  pipe = transformers.pipeline("text-generation", model=out, dtype=torch.float32)
  reply = pipe([dict(m) for m in CHAT], max_new_tokens=8, do_sample=False)
  ids = H.our_greedy(cfg, params, [tok.render_prompt(CHAT).tolist()], 8)[0]
  stops = set(tok.stop_ids())
  answer = ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]
  hf = transformers.AutoTokenizer.from_pretrained(out)
  assert reply[0]["generated_text"][-1] == {
      "role": "assistant", "content": hf.decode(answer, skip_special_tokens=True)}


def test_mixed_switches_are_refused():
  with pytest.raises(ValueError, match="qkv_bias"):
    hf_export.hf_family(ModelConfig(norm_plus_one=True, sandwich_norms=True, embed_scale=True,
                                    qk_norm=True, mlp_activation="gelu_tanh", qkv_bias=True))
  with pytest.raises(ValueError, match="sliding-window"):
    hf_export.hf_family(ModelConfig(local_layers=(0,), sliding_window=8))
  assert hf_export.hf_family(ModelConfig(qk_norm=True)) == "qwen3"
  assert np.isscalar(hf_export.hf_config(ModelConfig(qk_norm=True))["max_window_layers"])


# ------------------------------------------------------------------------------------- GGUF


def test_gguf_reads_back_as_the_same_model(exported, tmp_path):
  """Our importer reads the GGUF back (Gemma's 1 + w norms, the sliding-window flags, Qwen3's
  q/k norms) as the same configuration and logits; the gguf package reads it too."""
  import gguf
  from rlhf_jax.export import gguf_export
  family, cfg, params, tok, _ = exported
  if family == "qwen3":  # llama.cpp's qwen3 has no sliding-window layers: refused, then dropped
    with pytest.raises(ValueError, match="sliding-window"):
      gguf_export.write_gguf(params, cfg, str(tmp_path / "m.gguf"))
    cfg = dataclasses.replace(cfg, local_layers=(), sliding_window=0)
  path = gguf_export.write_gguf(params, cfg, str(tmp_path / "m.gguf"))
  reader = gguf.GGUFReader(path)
  assert bytes(reader.get_field("general.architecture").parts[-1]).decode() == family
  names = {t.name for t in reader.tensors}
  assert "blk.0.attn_q_norm.weight" in names
  assert ("blk.0.post_ffw_norm.weight" in names) == (family == "gemma3")
  back_cfg, back = hf_import.load_pretrained(path)
  # GGUF holds eps and Gemma's query scale (scalar ** -0.5) as float32.
  for field in ("norm_eps", "query_pre_attn_scalar"):
    assert getattr(back_cfg, field) == pytest.approx(getattr(cfg, field), rel=1e-6)
  approx = dict(norm_eps=cfg.norm_eps, query_pre_attn_scalar=cfg.query_pre_attn_scalar)
  assert dataclasses.replace(back_cfg, **approx) == cfg
  prompt = [tok.render_prompt(CHAT).tolist()]
  ours = H.our_logits(cfg, params, prompt)
  assert H.rel_err(H.our_logits(back_cfg, back, prompt), ours) <= 1e-6


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_gguf_loads_in_transformers(family, tmp_path):
  """transformers' own GGUF reader (its names, its dequantisation, its Gemma 3 defaults: every
  6th layer global, local rope base 10000, query scale 256^-0.5) on our file gives our logits.
  (Its qwen3 reader ignores attention.key_length and takes Qwen3's default head_dim, 128.)"""
  from rlhf_jax.export import gguf_export
  from rlhf_jax.models.transformer import Transformer
  import ppo_setup
  gemma = family == "gemma3"
  cfg = ModelConfig(vocab_size=len(VOCAB), d_model=64, n_layers=6 if gemma else 2, n_heads=4,
                    n_kv_heads=2, d_ff=96, head_dim=32 if gemma else 128, max_len=256,
                    norm_eps=1e-6,
                    rope_theta=1e6, tie_embeddings=gemma, qk_norm=True)
  if gemma:
    cfg = dataclasses.replace(
        cfg, norm_plus_one=True, sandwich_norms=True, mlp_activation="gelu_tanh",
        embed_scale=True, query_pre_attn_scalar=256.0, sliding_window=WINDOW,
        local_layers=(0, 1, 2, 3, 4), rope_local_theta=1e4)
  params = ppo_setup.random_params(Transformer(cfg), 3)
  gguf_export.write_gguf(params, cfg, str(tmp_path / "m.gguf"),
                         tokenizer=toy_tokenizer() if gemma else None)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
  tokens = [list(range(7, 7 + 40))]  # past the window
  assert H.rel_err(H.our_logits(cfg, params, tokens), H.hf_logits(model, tokens)) <= H.REL_TOL
  if gemma:  # the tokenizer travels as a SentencePiece vocabulary: the same ids and chat ids
    ours, again = toy_tokenizer(), HFTokenizer.load(str(tmp_path / "m.gguf"))
    for text in ("the answer is in", "你好 🤗  two  spaces\n"):
      assert again.encode(text) == ours.encode(text)
    assert again.render_prompt(CHAT).tolist() == ours.render_prompt(CHAT).tolist()
