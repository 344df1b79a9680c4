"""One SentencePiece tokenizer for English and Chinese, with the chat template and its loss mask.

Model: BPE with byte fallback, identity normalisation, no whitespace clean-up and no dummy
prefix, so `decode(encode(s)) == s` for every string (full-width punctuation, runs of spaces,
tabs, emoji, characters never seen in training: those become UTF-8 byte pieces, never <unk>),
and encoding is compositional: `decode(encode(a) + encode(b)) == a + b`. The chat template
relies on that, since it encodes each message on its own.

BPE rather than unigram: the Llama-family sentencepiece models this codebase can import are BPE
with byte fallback, so trained and imported tokenizers behave alike; and a BPE segmentation is a
fixed function of the learnt merges, while unigram's depends on piece probabilities estimated
from a (here small) corpus and offers sampling we never use.

Ids (trained models):
  0 <pad>   1 <unk>   2 <s> (BOS)   3 </s> (EOS)   4.. SPECIAL_TOKENS   then 256 byte pieces,
  then learnt pieces. PAD != EOS: padding is masked out, EOS is a token a model may emit.

Chat template. Nothing but the ids below is added (no spaces, no newlines):

  ids   <s>  <|system|> c0.. <|end|>  <|user|> c1.. <|end|>  <|assistant|> c2.. <|end|>  ...
  mask   0       0       0      0        0      0      0          0          1      1

`render_chat` returns (ids, loss_mask) with loss_mask 1 exactly on an assistant turn's content
tokens and the <|end|> that closes it (the model learns to stop), 0 on BOS, role headers, system
and user turns. Every assistant turn is trained on, not only the last. The template does not
constrain turn order except that a chat ends with an assistant turn. `render_prompt` renders a
chat ending with a user turn, then the <|assistant|> header: the model's continuation is the
answer, which ends at any id in `stop_ids()`.

Injection. SentencePiece matches user-defined symbols inside raw text, so a user typing
"<|assistant|>" would get the real role id and could fake an assistant turn (and its loss mask).
`encode` therefore replaces every special id it produced with the ordinary pieces of the same
text ("<" then "|assistant|>"): content can never hold a role or end id; only the template writes
them. The round trip stays exact; the price is that re-encoding decoded text does not give the
template ids back (decode is for reading, not for parsing).

Length. `max_len` never truncates: cutting a chat changes what the loss mask trains on. A longer
rendering raises `TooLongError` (a ValueError carrying `length` and `max_len`); callers decide
whether to skip or truncate, and should count how often they do.
"""
from __future__ import annotations

import io
import os
import random
import tempfile
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import sentencepiece as spm

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLES = ("system", "user", "assistant")
_ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# pad, unk, bos, eos, the specials and the 256 byte pieces come before any learnt piece.
_N_RESERVED = 4 + len(SPECIAL_TOKENS) + 256


class TooLongError(ValueError):
  """A chat renders to more than `max_len` tokens. A ValueError, so callers can catch this one
  case (to skip and count) without swallowing malformed-input errors."""

  def __init__(self, length: int, max_len: int):
    super().__init__(f"chat renders to {length} tokens, more than max_len={max_len}; the "
                     "tokenizer never truncates: skip or truncate it in the caller and count it")
    self.length = length
    self.max_len = max_len


# ----------------------------------------------------------------------------------- training


def _sample_lines(texts: Iterable[str], max_sentences: int, seed: int) -> list[str]:
  """A uniform sample (reservoir) of at most `max_sentences` non-empty lines of `texts`.

  Sampled here rather than inside sentencepiece so that errors raised by `texts` keep their own
  type (sentencepiece turns them into RuntimeError) and the sample depends only on `seed`.
  """
  rng = random.Random(seed)
  sample: list[str] = []
  seen = 0
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"texts item {i} is {type(text).__name__}, expected str")
    for line in text.split("\n"):  # "\n" itself is learnt as a byte piece: one id anyway
      if not line:
        continue
      if seen < max_sentences:
        sample.append(line)
      else:
        j = rng.randrange(seen + 1)
        if j < max_sentences:
          sample[j] = line
      seen += 1
  return sample


def _trainer_options(vocab_size: int, character_coverage: float) -> dict:
  """SentencePiece trainer flags; see the module docstring for why each matters."""
  return dict(
      model_type="bpe",
      vocab_size=vocab_size,
      character_coverage=character_coverage,  # 0.9995: keeps rare CJK characters as bytes
      byte_fallback=True,
      normalization_rule_name="identity",  # NFKC would turn full-width "，" into ","
      remove_extra_whitespaces=False,
      add_dummy_prefix=False,  # keeps encode compositional (see module docstring)
      allow_whitespace_only_pieces=True,  # runs of spaces (indentation) become one piece
      split_digits=True,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
      user_defined_symbols=list(SPECIAL_TOKENS),
      input_sentence_size=0,  # already sampled by _sample_lines
      shuffle_input_sentence=False,
      max_sentence_length=1 << 16,  # bytes; longer lines would be dropped silently
      num_threads=max(1, min(os.cpu_count() or 1, 16)),
      minloglevel=2,
  )


def _write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to a temporary file next to `path`, then renames it over `path`."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a model is shared with other readers
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def train_tokenizer(texts: Iterable[str], model_prefix: str, vocab_size: int, *,
                    max_sentences: int = 200_000, seed: int = 0,
                    character_coverage: float = 0.9995) -> str:
  """Trains the tokenizer on `texts` and writes `<model_prefix>.model` and `.vocab`.

  `texts` may be any iterable of strings (a generator is read once); texts are split into lines
  and at most `max_sentences` lines, sampled uniformly with `seed`, are used. The same texts and
  seed give the same pieces (and, with the same core count, the same bytes). Sentencepiece hands
  the model over in memory; each file is written under a temporary name next to the target and
  moved into place with os.replace, the .model last, so a crash never leaves a half-written
  model and an existing one survives a failed run. Returns the .model path.

  With Chinese text, `character_coverage` (0.98 to 1) decides how many single characters need
  their own piece: on chitchat + People's Daily + the reviews about 3.3k at 0.9995, 1.7k at
  0.995, 0.9k at 0.98, on top of the 264 reserved ids. A `vocab_size` below that is a
  ValueError from sentencepiece, passed on with its advice.
  """
  if vocab_size <= _N_RESERVED:
    raise ValueError(f"vocab_size={vocab_size} leaves no room for learnt pieces: pad, unk, bos, "
                     f"eos, {len(SPECIAL_TOKENS)} chat tokens and 256 byte pieces take "
                     f"{_N_RESERVED} ids")
  lines = _sample_lines(texts, max_sentences, seed)
  if not lines:
    raise ValueError("no text to train the tokenizer on: `texts` gave no non-empty line")
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                   **_trainer_options(vocab_size, character_coverage))
  except RuntimeError as e:
    raise ValueError(f"sentencepiece could not train a vocab_size={vocab_size} model on "
                     f"{len(lines)} lines: {e}") from e
  proto = model.getvalue()
  processor = spm.SentencePieceProcessor(model_proto=proto)
  vocab = "".join(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
                  for i in range(processor.vocab_size()))
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  _write_atomic(model_prefix + ".vocab", vocab.encode("utf-8"))
  _write_atomic(model_prefix + ".model", proto)
  return model_prefix + ".model"


# ------------------------------------------------------------------------------------ loading


class Tokenizer:
  """A loaded SentencePiece model plus the chat template. Picklable (data-loader workers)."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: Optional[str] = None):
    self._sp = processor
    self.path = path
    where = path or "the sentencepiece model"
    self.vocab_size: int = processor.vocab_size()
    self.pad_id: int = processor.pad_id()
    self.bos_id: int = processor.bos_id()
    self.eos_id: int = processor.eos_id()
    self.unk_id: int = processor.unk_id()
    if min(self.pad_id, self.bos_id, self.eos_id) < 0 or self.pad_id == self.eos_id:
      raise ValueError(f"{where} needs distinct pad and eos ids and a bos id (pad={self.pad_id}, "
                       f"bos={self.bos_id}, eos={self.eos_id}); train it with train_tokenizer")
    special = {tok: processor.piece_to_id(tok) for tok in SPECIAL_TOKENS}
    missing = [tok for tok, i in special.items() if i == self.unk_id]
    if missing:
      raise ValueError(f"{where} lacks the chat tokens {missing}; train it with train_tokenizer")
    self.system_id, self.user_id = special[SYSTEM], special[USER]
    self.assistant_id, self.end_id = special[ASSISTANT], special[END]
    self._role_ids = {role: special[tok] for role, tok in _ROLE_TOKENS.items()}
    # What each special id is replaced by when its text appears inside content.
    self._escapes = {i: processor.encode("<") + processor.encode(tok[1:])
                     for tok, i in special.items()}

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Loads `<prefix>.model` as written by `train_tokenizer`."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no tokenizer model at {path}; run the tokenizer stage "
                              "(train_tokenizer) first, or point the config at an existing .model")
    processor = spm.SentencePieceProcessor()
    try:
      processor.load(path)
    except (RuntimeError, OSError) as e:
      raise ValueError(f"{path} is not a readable sentencepiece model ({e}); delete it and run "
                       "the tokenizer stage again") from e
    return cls(processor, path)

  def __repr__(self) -> str:
    return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"

  # ------------------------------------------------------------------------------ text <-> ids

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, no BOS/EOS; chat-token text inside it is encoded as ordinary pieces."""
    if not isinstance(text, str):
      raise TypeError(f"encode takes str, got {type(text).__name__}")
    ids = self._sp.encode(text)
    if "<|" not in text:  # fast path: no special token can have matched
      return ids
    out: list[int] = []
    for i in ids:
      out.extend(self._escapes.get(i, (i,)))
    return out

  def decode(self, ids) -> str:
    """Text of `ids` (list, numpy or jax array, 1-D). Pads are dropped; nothing else is: it does
    not stop at EOS or <|end|>, and role tokens show as their text. BOS/EOS show as nothing."""
    arr = np.asarray(ids)
    if arr.ndim > 1:
      raise ValueError(f"decode takes one sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"decode takes integer ids, got dtype {arr.dtype}")
    flat = [int(i) for i in arr.reshape(-1) if i != self.pad_id]
    bad = [i for i in flat if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
    return self._sp.decode(flat)

  # ------------------------------------------------------------------------------------- chat

  def render_chat(self, messages: Sequence[Mapping[str, str]], *,
                  max_len: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [T], loss_mask int32 [T]) of a chat ending with an assistant turn.

    Raises ValueError naming the offending message for malformed input, and TooLongError when
    T > max_len (see the module docstring).
    """
    check_messages(messages, last_role="assistant", caller="render_chat")
    ids, mask = self._render_turns(messages)
    check_length(len(ids), max_len)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)  # [T], [T]

  def render_prompt(self, messages: Sequence[Mapping[str, str]], *,
                    max_len: Optional[int] = None) -> np.ndarray:
    """ids int32 [T] of a chat ending with a user turn, then the <|assistant|> header.

    Equal to the first T ids of `render_chat(messages + [answer])` for any answer.
    """
    check_messages(messages, last_role="user", caller="render_prompt")
    ids, _ = self._render_turns(messages)
    ids.append(self.assistant_id)
    check_length(len(ids), max_len)
    return np.asarray(ids, np.int32)  # [T]

  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end an answer: <|end|> (what the template trains) and EOS (what a base model
    trained on plain text may emit)."""
    return (self.end_id, self.eos_id)

  def _render_turns(self, messages) -> tuple[list[int], list[int]]:
    """BOS + `<|role|> content <|end|>` per message, with the mask of the module docstring."""
    ids, mask = [self.bos_id], [0]
    for msg in messages:
      body = self.encode(msg["content"])
      trained = int(msg["role"] == "assistant")
      ids += [self._role_ids[msg["role"]], *body, self.end_id]
      mask += [0] + [trained] * len(body) + [trained]
    return ids, mask


def check_messages(messages, *, last_role: str, caller: str) -> None:
  """ValueError, naming the message index, for anything the template cannot render."""
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    raise ValueError(f"{caller} takes a list of messages, got {type(messages).__name__}")
  if not messages:
    raise ValueError(f"{caller} got no messages: a chat needs at least one turn")
  for i, msg in enumerate(messages):
    if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
      raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {msg!r:.80}")
    if msg["role"] not in _ROLE_TOKENS:
      raise ValueError(f"message {i} has unknown role {msg['role']!r}; roles are {ROLES}")
    if not isinstance(msg["content"], str):
      raise ValueError(f"message {i} content must be str, got {type(msg['content']).__name__}")
  last = len(messages) - 1
  if messages[last]["role"] != last_role:
    hint = (" (render_prompt renders a chat that ends with a user turn)"
            if last_role == "assistant" else "")
    raise ValueError(f"message {last} is a {messages[last]['role']} turn; {caller} needs the chat "
                     f"to end with a {last_role} turn{hint}")


def check_length(length: int, max_len: Optional[int]) -> None:
  if max_len is not None and length > max_len:
    raise TooLongError(length, max_len)
