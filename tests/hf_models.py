"""Shared by the import tests of Qwen3 and Gemma 3: small randomly initialised `transformers`
models (no download), our forward and greedy sampler on the imported params, and transformers'
own forward and `generate` as the reference. Token ids are UTF-8 bytes (a 256-token vocabulary):
English text gives ids below 128, Chinese text three ids of 128 and above per character.

Import it after `pytest.importorskip("torch")` / `("transformers")`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from rlhf_jax.infer.sampling import SamplingParams, make_generate_fn
from rlhf_jax.models import hf_import
from rlhf_jax.models.transformer import Transformer

V = 256
REL_TOL = 1e-4
ENGLISH = "The quick brown fox jumps over the lazy dog while the cat sleeps."
CHINESE = "我们今天去公园散步，天气很好，孩子们玩得很开心。"


def byte_ids(text: str) -> list[int]:
  return list(text.encode("utf-8"))


def randomize(model, seed: int, norm_offset: bool = False):
  """Every parameter drawn at random, so a tensor mapped to the wrong place changes the logits.

  Norm weights scatter around 1 (or around 0 for Gemma's (1 + w) norms, `norm_offset`);
  embeddings have std 1 and the rest 0.15, which gives peaked logits (greedy ties unlikely).
  """
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_((0.0 if norm_offset else 1.0) + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 1.0 if "embed" in name else 0.15)
  return model.eval()


def save_and_import(model, directory: str):
  """(our ModelConfig, params) of `model` written as safetensors by transformers."""
  model.save_pretrained(directory, safe_serialization=True)
  return hf_import.load_pretrained(directory)


def rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def our_logits(model_config, params, tokens) -> np.ndarray:
  tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  fn = jax.jit(lambda p, t: Transformer(model_config).apply({"params": p}, t, positions,
                                                            jnp.ones_like(t))[0])
  return np.asarray(fn(params, tokens))


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def our_greedy(model_config, params, prompts, new_tokens: int) -> list[list[int]]:
  """Greedy continuations of `prompts` (lists of ids), left-padded into one batch."""
  width = max(map(len, prompts))
  tokens = np.array([[0] * (width - len(p)) + list(p) for p in prompts], np.int32)
  mask = (np.arange(width)[None] >= width - np.array([[len(p)] for p in prompts]))
  generate = make_generate_fn(model_config, new_tokens, (), 0, SamplingParams(greedy=True))
  out = generate({"params": params}, tokens, mask.astype(np.int32), jax.random.key(0))
  return np.asarray(out["tokens"]).tolist()


def hf_greedy(model, prompt, new_tokens: int) -> list[int]:
  with torch.no_grad():
    out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
  return out[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------------------------
# Tiny chat models as Hugging Face directories: stand-ins of Gemma 3 and Llama for tests that
# run a whole recipe on an imported model (weights, config.json and a tokenizer with its chat
# template), built from configs in a second, no download.

# The pieces of a toy tokenizer: byte fallback spells any text (Chinese as three bytes per
# character), a few merges shorten English. Each family adds its own turn tokens.
TOY_WORDS = ["\u2581", "e", "t", "a", "o", "h", "th", "\u2581th", "the", "\u2581the", "er",
             "in", "\u2581a", "\u2581i", "\u2581in", "an", "\u2581an", "\u2581is", "\u2581you"]
# ChatML, the turn format of SmolLM2-Instruct: the stand-in's template differs from Gemma's in
# every token, so a rendered prompt says which one a stage used.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
CHAT_FAMILIES = {
    # family: (special tokens: pad, eos, bos, unk, then turn tokens; chat template)
    "gemma3": (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
               "gemma"),
    "llama": (["<pad>", "</s>", "<s>", "<unk>", "<|im_start|>", "<|im_end|>"], "chatml"),
}


def sentencepiece_pieces(model_file: str) -> list[str]:
  """The ordinary pieces of a sentencepiece BPE model, in the order they were learnt (no
  control, unknown, byte or chat-marker pieces): a real vocabulary for a toy tokenizer."""
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_file=model_file)
  return [sp.id_to_piece(i) for i in range(sp.vocab_size())
          if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)
                  or sp.id_to_piece(i).startswith("<|"))]


def toy_chat_tokenizer(family: str, pieces=()):
  """An HFTokenizer of the family's turn tokens and chat template on a toy vocabulary, or on
  `pieces` (sentencepiece_pieces: English words and Chinese characters as single tokens)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

  from rlhf_jax.text import chat_template
  from rlhf_jax.text.hf_tokenizer import HFTokenizer, sentencepiece_merges
  specials, template = CHAT_FAMILIES[family]
  words = [p for p in dict.fromkeys(list(pieces) or TOY_WORDS) if p != "\n"]
  vocab = specials + ["\n"] + [f"<0x{b:02X}>" for b in range(256)] + words
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)},
                             merges=sentencepiece_merges(vocab), unk_token=specials[3],
                             fuse_unk=True, byte_fallback=True))
  tok.normalizer = normalizers.Replace(" ", "\u2581")
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
  source = chat_template.GEMMA_TEMPLATE if template == "gemma" else CHATML_TEMPLATE
  return HFTokenizer(tok, source, bos_token=specials[2], eos_token=specials[1],
                     pad_token=specials[0], unk_token=specials[3])


def write_tiny_chat_model(family: str, directory: str, seed: int = 0, pieces=()) -> str:
  """A randomly initialised `family` model ('gemma3' | 'llama') with its toy tokenizer (on
  `pieces`, see toy_chat_tokenizer), saved as a Hugging Face directory (safetensors,
  config.json, tokenizer.json and tokenizer_config.json with the chat template)."""
  import transformers
  tokenizer = toy_chat_tokenizer(family, pieces)
  ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
  common = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                **ids)
  if family == "gemma3":
    config = transformers.Gemma3TextConfig(
        **common, num_hidden_layers=2, head_dim=16, rms_norm_eps=1e-6, query_pre_attn_scalar=16,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        attn_implementation="eager",
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    model = randomize(transformers.Gemma3ForCausalLM(config), seed, norm_offset=True)
  else:
    config = transformers.LlamaConfig(**common, num_hidden_layers=2, rms_norm_eps=1e-5,
                                      rope_theta=10000.0, tie_word_embeddings=True)
    model = randomize(transformers.LlamaForCausalLM(config), seed)
  model.save_pretrained(directory, safe_serialization=True)
  tokenizer.save(directory)
  return directory
