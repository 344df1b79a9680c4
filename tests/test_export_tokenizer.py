"""The tokenizer.json written for our sentencepiece tokenizer gives sentencepiece's ids: on a
tokenizer with hundreds of learnt merges, for random mixtures of English, Chinese, emoji,
whitespace runs and characters outside the vocabulary; and the exported chat template (through
transformers) gives our render_prompt / render_chat ids, typed role markers included."""
import random

import pytest
import sentencepiece as spm

from rlhf_jax.text import hf_files
from rlhf_jax.text.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while training model reward policy answer "
         "question hello world how are you fine").split()
ZH = "我们今天去公园散步吧北京上海天气很好中国的首都是人工智能模型训练你好世界"
EXTRA = [" ", "  ", "   ", "\n", "\t", "，", "。", "🤗", "é", "Ω", "x1234", "<|", "|>", "<", "\u2581"]


def _corpus(n=3000, seed=0):
  rng = random.Random(seed)
  for _ in range(n):
    yield " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".!?,")
    yield "".join(rng.choice(ZH) for _ in range(rng.randint(4, 20))) + rng.choice("。，！？")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("tok") / "tokenizer")
  return Tokenizer.load(train_tokenizer(_corpus(), prefix, 700, character_coverage=1.0))


def _random_texts(n, seed=1):
  rng = random.Random(seed)
  pool = WORDS + list(ZH) + EXTRA
  for _ in range(n):
    yield "".join(rng.choice(pool) + rng.choice(["", " "]) for _ in range(rng.randint(1, 20)))


def test_merges_cover_learnt_pieces(tok):
  merges = hf_files.bpe_merges(spm.SentencePieceProcessor(model_file=tok.path))
  assert len(merges) > 200  # enough learnt pieces for the comparison below to mean something
  # Best piece first: "▁t" style pieces (ids 264..) come before later ones.
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  scores = [sp.get_score(sp.piece_to_id(a + b)) for a, b in merges]
  assert scores == sorted(scores, reverse=True)


def test_ids_equal_sentencepiece(tok):
  hf = hf_files.hf_tokenizer_object(tok)
  # Whole role markers are left out: raw HF encoding matches them as added tokens; in a chat
  # the exported template escapes them (test_chat_template_ids_equal_ours).
  texts = [t for t in _random_texts(1500) if not any(s in t for s in SPECIAL_TOKENS)]
  mismatched = [t for t in texts if hf.encode(t, add_special_tokens=False).ids != tok.encode(t)]
  assert mismatched == []
  for t in texts:  # a typed "\u2581" reads back as a space on both sides
    assert hf.decode(tok.encode(t), skip_special_tokens=False) == tok.decode(tok.encode(t))


def test_chat_template_ids_equal_ours(tok, tmp_path):
  transformers = pytest.importorskip("transformers")
  hf_files.write_tokenizer_files(tok, str(tmp_path), max_len=512)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  rng = random.Random(2)
  for text in list(_random_texts(40, seed=3)):
    typed = text + rng.choice(["<|end|>", "<|assistant|>x", "a<|user|>b<|system|>", ""])
    chat = [{"role": "system", "content": "sys " + text}, {"role": "user", "content": typed},
            {"role": "assistant", "content": text[::-1]}, {"role": "user", "content": "再来"}]
    prompt = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert prompt == tok.render_prompt(chat).tolist(), typed
    whole = hf.apply_chat_template(chat[:3], tokenize=True)
    whole = list(whole["input_ids"] if hasattr(whole, "keys") else whole)
    assert whole == tok.render_chat(chat[:3])[0].tolist()
