"""The data card prints counts and lengths per dataset, split and language."""
import json
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import builders, card


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  path = str(tmp_path_factory.mktemp("tfds"))
  dialogues = [{"messages": [{"role": "user", "content": q},
                             {"role": "assistant", "content": a}]}
               for q, a in [("hi", "hello"), ("how are you?", "fine, thanks"),
                            ("你好", "你好！"), ("你是谁？", "我是一个程序。"), ("what?", "nothing")]]
  builders.write_records("rlhf_dialogues", dialogues, config="tiny", data_dir=path,
                         fractions=(0.6, 0.2, 0.2))
  builders.write_records("rlhf_text", [{"text": "一二三"}, {"text": "abcdef"}], config="tiny",
                         data_dir=path, fractions=(1, 0, 0))
  return path


def test_card_counts_both_languages(data_dir, capsys):
  card.main([f"--data_dir={data_dir}"])
  out = capsys.readouterr().out
  assert "rlhf_dialogues/tiny:1.0.0" in out and "rlhf_text/tiny:1.0.0" in out
  langs = [line.split()[0] for line in out.splitlines()
           if line.startswith(" ") and line.split()[0] in ("en", "zh")]
  assert "en" in langs and "zh" in langs

  card.main([f"--data_dir={data_dir}", "--json"])
  info = json.loads(capsys.readouterr().out)
  text = info["datasets"]["rlhf_text/tiny:1.0.0"]["splits"]["train"]
  assert text["count"] == 2
  assert text["langs"] == {"en": {"count": 1, "length": {"total": 6, "mean": 6.0, "min": 6,
                                                         "p50": 6, "p90": 6, "p99": 6,
                                                         "max": 6}},
                           "zh": {"count": 1, "length": {"total": 3, "mean": 3.0, "min": 3,
                                                         "p50": 3, "p90": 3, "p99": 3,
                                                         "max": 3}}}
  splits = info["datasets"]["rlhf_dialogues/tiny:1.0.0"]["splits"]
  assert sum(s["count"] for s in splits.values()) == 5
  assert sum(s["langs"].get("zh", {}).get("count", 0) for s in splits.values()) == 2


def test_card_runs_as_a_module(data_dir):
  out = subprocess.run([sys.executable, "-m", "rlhf_jax.data.card", f"--data_dir={data_dir}"],
                       capture_output=True, text=True, check=True, timeout=120).stdout
  assert "rlhf_text/tiny" in out and " zh " in out and " en " in out


def test_record_text_joins_every_text_field():
  assert card.record_text({"id": "x", "lang": "en", "prompt": "p",
                           "responses": ["a", "b"]}) == "p\na\nb"
  assert card.record_text({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a"}]}) == "q\na"


def test_card_counts_tokens_per_language(data_dir, bundled_tokenizer, capsys):
  """With a tokenizer, each language's total is the sum of its records' token counts, counted
  here by a plain loop over the records with the same tokenizer."""
  from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
  card.main([f"--data_dir={data_dir}", f"--tokenizer={bundled_tokenizer}", "--json",
             "--only=rlhf_dialogues"])
  info = json.loads(capsys.readouterr().out)
  assert info["unit"] == "tokens" and list(info["datasets"]) == ["rlhf_dialogues/tiny:1.0.0"]
  tok = load_any_tokenizer(bundled_tokenizer)
  path = dict(card.find_datasets(data_dir))["rlhf_dialogues/tiny:1.0.0"]
  builder = tfds.builder_from_directory(path)
  splits = info["datasets"]["rlhf_dialogues/tiny:1.0.0"]["splits"]
  for split, split_info in splits.items():
    expected = {}
    for record in card.read_split(builder, split):
      n = len(tok.encode(card.record_text(record)))
      expected[record["lang"]] = expected.get(record["lang"], 0) + n
    assert {lang: sub["length"]["total"] for lang, sub in split_info["langs"].items()} == expected
    assert sum(expected.values()) > 0 or split_info["count"] == 0


def test_card_names_what_only_did_not_find(data_dir):
  with pytest.raises(SystemExit, match="rlhf_prompts.*there: .*rlhf_dialogues/tiny"):
    card.main([f"--data_dir={data_dir}", "--only=rlhf_prompts"])


def test_sft_mix_counts_rendered_tokens_and_repeats_a_language(data_dir, bundled_tokenizer):
  """The SFT mix against a plain loop: each train dialogue rendered by the chat template (all
  shorter than seq_len here), the assistant-masked tokens counted, Chinese counted 3 times."""
  from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
  tok = load_any_tokenizer(bundled_tokenizer)
  path = dict(card.find_datasets(data_dir))["rlhf_dialogues/tiny:1.0.0"]
  want = {}
  for record in card.read_split(tfds.builder_from_directory(path), "train"):
    ids, mask = tok.render_chat(record["messages"])
    times = 3 if record["lang"] == "zh" else 1
    m = want.setdefault(record["lang"], {"records": 0, "tokens": 0, "trained": 0})
    m["records"] += times
    m["tokens"] += times * len(ids)
    m["trained"] += times * int(sum(mask))
  got = card.sft_mix(data_dir, bundled_tokenizer, 128, "zh:3", name="rlhf_dialogues/tiny")
  assert {lang: {k: v for k, v in m.items() if k != "share"} for lang, m in got.items()} == want
  assert sum(m["share"] for m in got.values()) == pytest.approx(100.0, abs=0.2)
