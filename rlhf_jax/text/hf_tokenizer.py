"""A Hugging Face `tokenizers` tokenizer and its chat template, behind our Tokenizer's interface.

Imported models come with their own tokenizer; trainers, the sampler and the chat front end
only use `encode`, `decode`, `render_chat`, `render_prompt`, `stop_ids` and the ids `pad_id`,
`bos_id`, `eos_id`, `vocab_size`, so either tokenizer plugs into them:

  tok = HFTokenizer.load("path/to/hf_dir")      # tokenizer.json + tokenizer_config.json
  tok = HFTokenizer.load("model.gguf")          # the vocabulary and template inside the GGUF

Chat template. The model's own Jinja template (as `transformers.apply_chat_template` renders
it: rlhf_jax.text.chat_template) is rendered once with a marker in place of each
message's content. The text between markers is the template's (role headers, turn ends) and
is encoded with special tokens recognised; each content is encoded on its own with special
tokens *not* recognised, so a user who types "<|im_end|>" gets ordinary pieces, never a turn
boundary (the same injection rule as our sentencepiece tokenizer). A template that trims
content (Llama 3's `| trim`) is detected from the marker's padding and the content trimmed too.

Loss mask: 1 on each assistant content and on the template tokens after it up to and including
the turn-end token (the model learns to stop), 0 elsewhere. The turn-end token is found by
rendering a probe chat: the first special token the template writes after an assistant's
content (<|im_end|> for ChatML, <|eot_id|> for Llama 3, </s> for Mistral).

Ids. `stop_ids` = the turn end, EOS and any generation_config.json eos ids. `pad_id` must differ
from every stop id (PAD != EOS): the tokenizer's pad token if it qualifies, else the first
special token the template never writes, else unk. `bos_id` is the BOS token, or EOS for
tokenizers without one (Qwen2), for plain-text documents `[bos] + text + [eos]`.

Markers and the whole-string rendering can split text differently at a template/content
boundary than tokenizing the whole rendered string would; both training and generation go
through this class, so the model always sees one consistent segmentation.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np

from rlhf_jax.core.metrics import read_json
from rlhf_jax.text import chat_template as jinja_chat
from rlhf_jax.text.tokenizer import TooLongError, check_length, check_messages  # noqa: F401

_SPACE = "\u2581"  # SentencePiece's visible space
_PAD = "\u2003"  # an em space: whitespace a `trim` removes, never written by a template
_MARK = re.compile(f"({_PAD}?)\ue000(\\d+)\ue001({_PAD}?)")

# Pre-tokenizer split patterns of byte-level BPE vocabularies, by GGUF `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT}


def _token_text(value) -> Optional[str]:
  """tokenizer_config.json writes special tokens as strings or AddedToken dicts."""
  if isinstance(value, dict):
    return value.get("content")
  return value


# Architectures whose GGUF 'llama' (SentencePiece BPE) vocabulary is rebuilt by `_gemma_bpe`.
GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


def sentencepiece_merges(tokens: Sequence[str]) -> list[tuple[str, str]]:
  """BPE merges implied by a SentencePiece BPE vocabulary whose pieces are listed in the order
  they were learnt: every way of cutting a piece into two pieces of the vocabulary, ranked by
  the piece's position (earlier = merged first), the longer left part first within a piece.

  A GGUF file keeps no merges for SentencePiece vocabularies, and Gemma's scores do not follow
  its merge order (its positions do), so the position is the rank.
  """
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  for piece, _ in sorted(vocab.items(), key=lambda item: item[1]):
    for cut in range(len(piece) - 1, 0, -1):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        merges.append((left, right))
  return merges


def _gemma_bpe(meta: dict):
  """A `tokenizers.Tokenizer` from Gemma's GGUF SentencePiece vocabulary ('llama' model).

  SentencePiece writes a space as U+2581 and has no pre-tokenizer split and no prefix space;
  unknown characters fall back to the <0xNN> byte pieces. The file spells its pieces of two or
  more spaces with real spaces; after the space -> U+2581 normalisation the text can only meet
  them as U+2581 runs, so that is how they are spelled here (ordinary pieces then, not added
  tokens matched before the normalisation).
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
  tokens = [(_SPACE * len(t)) if t and not t.strip(" ") else t
            for t in meta["tokenizer.ggml.tokens"]]
  vocab = {t: i for i, t in enumerate(tokens)}
  unk = tokens[int(meta.get("tokenizer.ggml.unknown_token_id", 3))]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens), unk_token=unk,
                             fuse_unk=True, byte_fallback=True))
  tok.normalizer = normalizers.Replace(" ", _SPACE)
  tok.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  raw = meta["tokenizer.ggml.tokens"]
  types = meta.get("tokenizer.ggml.token_type")
  if types is not None:  # 3 = control (special), 4 = user-defined (matched whole, not special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(raw, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(raw, types) if ty == 4 and t in vocab])
  return tok


def gguf_tokenizer(meta: dict, path: str):
  """A `tokenizers.Tokenizer` from a GGUF file's byte-level BPE vocabulary ('gpt2' model) or
  Gemma's SentencePiece BPE one ('llama' model in a gemma file)."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
  arch = meta.get("general.architecture")
  if kind == "llama" and arch in GEMMA_ARCHS:
    return _gemma_bpe(meta)
  if kind != "gpt2":
    raise ValueError(f"{path}: tokenizer model {kind!r} of architecture {arch!r} cannot be "
                     "rebuilt from GGUF here (byte-level BPE 'gpt2', or Gemma's SentencePiece "
                     "'llama'); load the tokenizer.json of the HF checkpoint")
  tokens = meta["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                   ignore_merges=pre in _SPLITS and _SPLITS[pre] is _LLAMA3_SPLIT)
  tok = Tokenizer(bpe)
  if pre == "smollm":  # SmolLM2's tokenizer.json: single digits, then GPT-2's byte-level split
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  elif pre in ("default", "gpt2"):
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  elif pre in _SPLITS:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: smollm, gpt2, "
                     f"{', '.join(sorted(_SPLITS))}")
  tok.decoder = decoders.ByteLevel()
  types = meta.get("tokenizer.ggml.token_type")
  if types is not None:  # 3 = control (special), 4 = user-defined (matched whole, not special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == 4])
  return tok


@functools.lru_cache(maxsize=4)
def _gguf_parts(path: str, size: int, mtime_ns: int):
  """(tokenizers.Tokenizer, chat template, special tokens) of a .gguf file, built once a
  process for each version of the file (size and mtime are in the key so a replaced file is
  read again): reading a 262k-token vocabulary and deriving its merges takes 6-10 s, and every
  stage of a pipeline opens the tokenizer, some several times. The Tokenizer is shared by the
  HFTokenizers built from it; nothing here changes it after it is built."""
  del size, mtime_ns  # the cache key only
  from rlhf_jax.models.gguf_io import GGUFFile
  meta = GGUFFile(path).metadata
  tokens = meta.get("tokenizer.ggml.tokens")
  if tokens is None:
    raise ValueError(f"{path} carries no tokenizer (no tokenizer.ggml.tokens)")

  def tok(key):
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[i] if i is not None else None

  template = (meta.get("tokenizer.chat_template")
              or jinja_chat.FAMILY_TEMPLATES.get(meta.get("general.architecture"), ""))
  special = dict(bos_token=tok("bos_token_id"), eos_token=tok("eos_token_id"),
                 pad_token=tok("padding_token_id"), unk_token=tok("unknown_token_id"))
  return gguf_tokenizer(meta, path), template, special


class HFTokenizer:
  """See the module docstring. Picklable (data-loader workers)."""

  def __init__(self, tokenizer, chat_template: str, *, bos_token=None, eos_token=None,
               pad_token=None, unk_token=None, extra_stop_ids: Sequence[int] = (),
               vocab_size: Optional[int] = None, path: Optional[str] = None):
    self._tok = tokenizer
    self.path = path
    self.chat_template = chat_template
    if not chat_template:
      raise ValueError(f"{path or 'the tokenizer'} has no chat template; render_chat needs one")
    self._tokens = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token,
                    "unk_token": unk_token}
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    self.vocab_size: int = max(n, vocab_size or 0)
    self.eos_id = self._id(eos_token, "eos_token")
    self.bos_id = self._id(bos_token, "bos_token") if bos_token else self.eos_id
    self.unk_id = self._id(unk_token, "unk_token") if unk_token else None
    self._plain = None
    self.end_id = self._find_turn_end()
    self._stop = tuple(dict.fromkeys([self.end_id, self.eos_id, *extra_stop_ids]))
    self.pad_id = self._choose_pad(pad_token)

  # --------------------------------------------------------------------------------- loading

  @classmethod
  def load(cls, path: str, vocab_size: Optional[int] = None) -> "HFTokenizer":
    """From an HF checkpoint directory (or its tokenizer.json) or a .gguf file."""
    if path.endswith(".gguf"):
      stat = os.stat(path)
      tokenizer, template, special = _gguf_parts(os.path.realpath(path), stat.st_size,
                                                 stat.st_mtime_ns)
      return cls(tokenizer, template, **special, vocab_size=vocab_size, path=path)
    directory = os.path.dirname(path) if path.endswith(".json") else path
    from tokenizers import Tokenizer
    file = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"no tokenizer.json in {directory}")
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    template = config.get("chat_template") or ""
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t["name"]: t["template"] for t in template}
      template = named.get("default", next(iter(named.values()), ""))
    jinja = os.path.join(directory, "chat_template.jinja")
    if not template and os.path.isfile(jinja):
      with open(jinja) as f:
        template = f.read()
    generation = _read_json(os.path.join(directory, "generation_config.json"))
    stops = generation.get("eos_token_id") or []
    stops = [stops] if isinstance(stops, int) else list(stops)
    model_vocab = _read_json(os.path.join(directory, "config.json")).get("vocab_size")
    return cls(Tokenizer.from_file(file), template,
               bos_token=_token_text(config.get("bos_token")),
               eos_token=_token_text(config.get("eos_token")),
               pad_token=_token_text(config.get("pad_token")),
               unk_token=_token_text(config.get("unk_token")), extra_stop_ids=stops,
               vocab_size=vocab_size or model_vocab, path=path)

  def save(self, directory: str) -> None:
    """Writes tokenizer.json and tokenizer_config.json (with the chat template) for HF tools."""
    os.makedirs(directory, exist_ok=True)
    self._tok.save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": self.chat_template,
              "model_max_length": 1 << 20, "add_bos_token": False, "add_eos_token": False,
              **{k: v for k, v in self._tokens.items() if v is not None},
              "pad_token": self._tok.id_to_token(self.pad_id)}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)

  def __repr__(self) -> str:
    return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_tok"] = self._tok.to_str()
    state["_plain"] = None
    return state

  def __setstate__(self, state):
    from tokenizers import Tokenizer
    state["_tok"] = Tokenizer.from_str(state["_tok"])
    self.__dict__.update(state)

  def _id(self, token: Optional[str], what: str) -> int:
    i = self._tok.token_to_id(token) if token else None
    if i is None:
      raise ValueError(f"{self.path or 'the tokenizer'}: {what} {token!r} is not in the "
                       "vocabulary")
    return i

  # ------------------------------------------------------------------------------ text <-> ids

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, no BOS/EOS; special-token text inside it is encoded as ordinary pieces."""
    if not isinstance(text, str):
      raise TypeError(f"encode takes str, got {type(text).__name__}")
    if self._plain is None:
      from tokenizers import Tokenizer
      self._plain = Tokenizer.from_str(self._tok.to_str())
      self._plain.encode_special_tokens = True
    return self._plain.encode(text, add_special_tokens=False).ids

  def _encode_template(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """Text of `ids` (1-D). Pads are dropped; special tokens show as their text."""
    arr = np.asarray(ids)
    if arr.ndim > 1:
      raise ValueError(f"decode takes one sequence, got shape {arr.shape}")
    flat = [int(i) for i in arr.reshape(-1) if i != self.pad_id]
    bad = [i for i in flat if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
    return self._tok.decode(flat, skip_special_tokens=False)

  # ------------------------------------------------------------------------------------- chat

  def render_chat(self, messages: Sequence[Mapping[str, str]], *,
                  max_len: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [T], loss_mask int32 [T]) of a chat ending with an assistant turn."""
    check_messages(messages, last_role="assistant", caller="render_chat")
    ids, mask = self._render(messages, generation_prompt=False)
    check_length(len(ids), max_len)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

  def render_prompt(self, messages: Sequence[Mapping[str, str]], *,
                    max_len: Optional[int] = None) -> np.ndarray:
    """ids int32 [T] of a chat ending with a user turn, then the assistant header."""
    check_messages(messages, last_role="user", caller="render_prompt")
    ids, _ = self._render(messages, generation_prompt=True)
    check_length(len(ids), max_len)
    return np.asarray(ids, np.int32)

  def stop_ids(self) -> tuple[int, ...]:
    return self._stop

  def _render_text(self, messages, generation_prompt: bool) -> str:
    """The chat as transformers' apply_chat_template(tokenize=False) renders it."""
    return jinja_chat.render(self.chat_template, messages,
                             add_generation_prompt=generation_prompt,
                             **{k: v or "" for k, v in self._tokens.items()})

  def _pieces(self, messages, generation_prompt: bool):
    """[(is_content, message index or -1, text)] of the rendered chat, in order."""
    marked = [dict(m, content=f"{_PAD}\ue000{i}\ue001{_PAD}") for i, m in enumerate(messages)]
    text = self._render_text(marked, generation_prompt)
    pieces, pos = [], 0
    for match in _MARK.finditer(text):
      pieces.append((False, -1, text[pos:match.start()]))
      i = int(match.group(2))
      content = messages[i]["content"]
      if not match.group(1):
        content = content.lstrip()
      if not match.group(3):
        content = content.rstrip()
      pieces.append((True, i, content))
      pos = match.end()
    pieces.append((False, -1, text[pos:]))
    return pieces

  def _render(self, messages, generation_prompt: bool) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    mask: list[int] = []
    after_assistant = False
    for is_content, i, text in self._pieces(messages, generation_prompt):
      if is_content:
        body = self.encode(text)
        trained = messages[i]["role"] == "assistant"
        ids += body
        mask += [int(trained)] * len(body)
        after_assistant = trained
        continue
      piece = self._encode_template(text) if text else []
      piece_mask = [0] * len(piece)
      if after_assistant and self.end_id in piece:  # train the turn end, not what follows
        cut = piece.index(self.end_id) + 1
        piece_mask[:cut] = [1] * cut
      ids += piece
      mask += piece_mask
      after_assistant = False
    return ids, mask

  def _find_turn_end(self) -> int:
    """The first special token the template writes after an assistant's content."""
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    pieces = self._pieces(probe, generation_prompt=False)
    after = pieces[-1][2]
    special = set(self._special_ids())
    for i in self._encode_template(after):
      if i in special:
        return i
    return self.eos_id

  def template_token_ids(self) -> tuple[int, ...]:
    """The special tokens the chat template writes around a user and an assistant turn
    (Gemma 3: <bos>, <start_of_turn>, <end_of_turn>): what LoRA trains as embedding rows
    (`lora.tokens`), since a base model never saw them."""
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    written = self._render(probe, False)[0]
    special = set(self._special_ids())
    return tuple(dict.fromkeys(i for i in written if i in special))

  def _special_ids(self) -> list[int]:
    return [i for i, t in sorted(self._tok.get_added_tokens_decoder().items()) if t.special]

  def _choose_pad(self, pad_token: Optional[str]) -> int:
    pad = self._tok.token_to_id(pad_token) if pad_token else None
    if pad is not None and pad not in self._stop:
      return pad
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}]
    written = set(self._render(probe, False)[0])
    written |= set(self._render(probe[:2], True)[0])
    for i in self._special_ids():
      if i not in self._stop and i not in written and i != self.bos_id:
        return i
    if self.unk_id is not None and self.unk_id not in self._stop:
      return self.unk_id
    raise ValueError(f"{self.path or 'the tokenizer'}: no token can serve as padding (PAD must "
                     "differ from every stop id); pass pad_token")


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  return read_json(path)


def load_any_tokenizer(path: str, vocab_size: Optional[int] = None):
  """Our sentencepiece Tokenizer for a .model file; an HFTokenizer for an HF directory, a .gguf
  file or a preset name (`smollm2_135m`). Every place that opens a run's tokenizer goes through
  here, so each stage works with either kind."""
  if path.endswith(".model"):
    from rlhf_jax.text.tokenizer import Tokenizer
    return Tokenizer.load(path)
  from rlhf_jax.models import pretrained
  return HFTokenizer.load(pretrained.resolve(path), vocab_size)
