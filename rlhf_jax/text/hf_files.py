"""Our sentencepiece tokenizer as Hugging Face tokenizer files that give the same ids.

An exported checkpoint is only usable by `AutoTokenizer`, `pipeline("text-generation")` or an
HF-compatible server if its tokenizer files reproduce, id for id, what the model was trained
on. `write_tokenizer_files(tok, directory)` writes:

  tokenizer.json         a `tokenizers` BPE model equivalent to the sentencepiece model
  tokenizer.model        the sentencepiece model itself (for clients that read only that)
  tokenizer_config.json  special tokens, no automatic BOS/EOS, the chat template (Jinja)
  special_tokens_map.json

Why the BPE model is built here rather than by transformers' converter: sentencepiece BPE
merges, at each step, the adjacent pair whose concatenation is the vocabulary piece with the
highest score. Listing every split (left, right) of every ordinary piece as a merge, ranked by
that piece's score, makes HF's rank-ordered BPE take the same steps. Pieces never merge into
chat tokens (those are added tokens, matched whole), characters outside the vocabulary become
<0xXX> byte pieces on both sides (byte fallback), spaces become "▁" and nothing is prepended
(the model has no dummy prefix), so `decode(encode(s)) == s` as with our tokenizer.

Role markers typed by a user. Our `Tokenizer.encode` turns a chat token found in content into
"<" followed by the ordinary pieces of "|assistant|>" (and so on). Two parts reproduce that:

  - the chat template writes content with every "<|" replaced by "<" U+FDD0 "|" (U+FDD0 is a
    Unicode noncharacter), so the text no longer holds the added token and HF does not match it;
    the normalizer maps "<" U+FDD0 "|" back to "<|" before the BPE model sees it;
  - a pre-tokenizer isolates "<" before a chat-token tail and the tail "|role|>" itself, as
    sentencepiece's whole-symbol match (then our escaping) splits them from their neighbours.

So `apply_chat_template(..., tokenize=True)` on an exported model gives the ids of our
`render_prompt` / `render_chat`, and a user typing "<|assistant|>" gets text on both sides. The
one visible difference: a user who literally types "<" U+FDD0 "|" gets the ids of "<|".
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import sentencepiece as spm

from rlhf_jax.text.tokenizer import ASSISTANT, END, SPECIAL_TOKENS, Tokenizer

ESCAPE = "<\ufdd0|"  # what the exported template writes for a "<|" typed inside content
_TAILS = "|".join(re.escape(t[1:]) for t in SPECIAL_TOKENS)  # \|system\|>|\|user\|>|...
_MARKER_SPLIT = f"<(?=(?:{_TAILS}))|(?:{_TAILS})"

# Files an imported model's tokenizer may consist of; copied as they are.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                      "chat_template.jinja", "chat_template.json")


def chat_template_jinja() -> str:
  """Jinja that renders our chat template (rlhf_jax/text/tokenizer.py) as text: BOS, then per
  message `<|role|>content<|end|>`, then `<|assistant|>` for a generation prompt."""
  roles = "['system', 'user', 'assistant']"
  return (
      "{{ bos_token }}"
      "{% for message in messages %}"
      f"{{% if message['role'] not in {roles} %}}"
      "{{ raise_exception('unknown role ' + message['role'] + ': this model knows system, "
      "user and assistant') }}{% endif %}"
      "{{ '<|' + message['role'] + '|>' }}"
      f"{{{{ message['content'] | replace('<|', '{ESCAPE}') }}}}"
      f"{{{{ '{END}' }}}}"
      "{% endfor %}"
      f"{{% if add_generation_prompt %}}{{{{ '{ASSISTANT}' }}}}{{% endif %}}")


def _ordinary_pieces(sp: spm.SentencePieceProcessor) -> dict[str, int]:
  """Pieces the BPE merges may produce or consume: not control, unknown, byte, unused or a
  chat token."""
  out = {}
  for i in range(sp.vocab_size()):
    piece = sp.id_to_piece(i)
    if (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)
        or piece in SPECIAL_TOKENS):
      continue
    out[piece] = i
  return out


def bpe_merges(sp: spm.SentencePieceProcessor) -> list[tuple[str, str]]:
  """Every (left, right) whose concatenation is an ordinary piece, best piece first (highest
  sentencepiece score; then lower id, then the split nearer the start)."""
  pieces = _ordinary_pieces(sp)
  ranked = []
  for piece, i in pieces.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in pieces and right in pieces:
        ranked.append((-sp.get_score(i), i, k, left, right))
  ranked.sort()
  return [(left, right) for _, _, _, left, right in ranked]


def hf_tokenizer_object(tok: Tokenizer):
  """A `tokenizers.Tokenizer` that encodes and decodes as `tok` (module docstring)."""
  from tokenizers import AddedToken, Regex
  from tokenizers import Tokenizer as HFTok
  from tokenizers import decoders, models, normalizers, pre_tokenizers
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
  model = models.BPE(vocab=vocab, merges=bpe_merges(sp), unk_token=sp.id_to_piece(tok.unk_id),
                     byte_fallback=True, fuse_unk=True)
  out = HFTok(model)
  out.normalizer = normalizers.Sequence([normalizers.Replace(ESCAPE, "<|"),
                                         normalizers.Replace(" ", "\u2581")])
  out.pre_tokenizer = pre_tokenizers.Split(Regex(_MARKER_SPLIT), behavior="isolated")
  out.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  specials = [i for i in range(sp.vocab_size())
              if sp.is_control(i) or sp.is_unknown(i) or sp.id_to_piece(i) in SPECIAL_TOKENS]
  out.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                          for i in specials])
  return out


def tokenizer_config(tok: Tokenizer, max_len: Optional[int] = None) -> dict:
  """tokenizer_config.json: special tokens by text, no BOS/EOS added on encode (the chat
  template writes BOS), decoding without clean-up (it would change " ." to ".")."""
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  return {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": sp.id_to_piece(tok.bos_id), "eos_token": sp.id_to_piece(tok.eos_id),
      "unk_token": sp.id_to_piece(tok.unk_id), "pad_token": sp.id_to_piece(tok.pad_id),
      "additional_special_tokens": list(SPECIAL_TOKENS),
      "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
      "model_max_length": int(max_len) if max_len else 1 << 20,
      "padding_side": "left", "chat_template": chat_template_jinja(),
  }


def write_tokenizer_files(tok: Tokenizer, directory: str, max_len: Optional[int] = None) -> None:
  """Writes the files of the module docstring into `directory`."""
  if not tok.path or not os.path.isfile(tok.path):
    raise ValueError(f"{tok!r} has no sentencepiece model file to export")
  os.makedirs(directory, exist_ok=True)
  hf_tokenizer_object(tok).save(os.path.join(directory, "tokenizer.json"))
  shutil.copyfile(tok.path, os.path.join(directory, "tokenizer.model"))
  config = tokenizer_config(tok, max_len)
  write_json(os.path.join(directory, "tokenizer_config.json"), config)
  write_json(os.path.join(directory, "special_tokens_map.json"),
             {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token",
                                     "additional_special_tokens")})


def copy_tokenizer_files(source_dir: str, directory: str) -> list[str]:
  """Copies an imported model's own tokenizer files; returns the names copied."""
  copied = []
  for name in HF_TOKENIZER_FILES:
    path = os.path.join(source_dir, name)
    if os.path.isfile(path):
      shutil.copyfile(path, os.path.join(directory, name))
      copied.append(name)
  if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
    raise FileNotFoundError(f"{source_dir} holds no tokenizer.json or tokenizer.model to export")
  return copied


def write_json(path: str, data: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, ensure_ascii=False)
