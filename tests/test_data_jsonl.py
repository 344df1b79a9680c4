"""JSONL importers: good files round-trip through TFDS; bad lines are all reported, nothing is
written."""
import json
import os

import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data import builders, jsonl, pipeline


@pytest.fixture(autouse=True, scope="module")
def _quiet():
  tfds.disable_progress_bar()


def write_jsonl(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
  return str(path)


def read_back(name, data_dir):
  records = []
  for split in tfds.builder(name, data_dir=data_dir).info.splits:
    source = tfds.data_source(name, data_dir=data_dir, split=split)
    records += [pipeline.decode_record(r) for r in source.__getitems__(range(len(source)))]
  return sorted(records, key=lambda r: r["id"])


GOOD = {
    "pairs": [
        {"prompt": "What is AI?", "chosen": "The study of thinking machines.",
         "rejected": "A fish.", "id": "p1"},
        {"chosen": "\n\nHuman: 你好吗？\n\nAssistant: 我很好，谢谢！",
         "rejected": "\n\nHuman: 你好吗？\n\nAssistant: 不知道。", "id": "p2"},
    ],
    "rankings": [
        {"prompt": "Name a colour", "responses": ["red", "a car", "blue"], "ranking": [2, 0, 1],
         "id": "r1", "source": "people"},
        {"prompt": "说一个颜色", "responses": ["红色", "汽车"], "ranking": [0, 1], "id": "r2"},
    ],
    "grades": [
        {"prompt": "Say hi", "responses": ["hi!", "go away", "hello"],
         "grades": ["good", "poor", "average"], "id": "g1", "lang": "en"},
        {"prompt": "打个招呼", "responses": ["你好", "走开"], "grades": [0, 2], "id": "g2"},
    ],
    "feedback": [
        {"prompt": "Tell me a joke", "completion": "Why did the chicken...", "label": 1,
         "id": "f1"},
        {"prompt": "讲个笑话", "completion": "不要。", "label": False, "id": "f2"},
    ],
    "messages": [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}], "id": "m1"},
        {"messages": [{"role": "user", "content": "你好"},
                      {"role": "assistant", "content": "你好！"}], "id": "m2"},
    ],
}

EXPECTED = {
    "pairs": [
        {"id": "p1", "prompt": "What is AI?", "responses": ["The study of thinking machines.",
                                                            "A fish."],
         "grades": [], "ranking": [0, 1], "lang": "en", "source": ""},
        {"id": "p2", "prompt": "你好吗？", "responses": ["我很好，谢谢！", "不知道。"],
         "grades": [], "ranking": [0, 1], "lang": "zh", "source": ""},
    ],
    "rankings": [
        {"id": "r1", "prompt": "Name a colour", "responses": ["red", "a car", "blue"],
         "grades": [], "ranking": [2, 0, 1], "lang": "en", "source": "people"},
        {"id": "r2", "prompt": "说一个颜色", "responses": ["红色", "汽车"], "grades": [],
         "ranking": [0, 1], "lang": "zh", "source": ""},
    ],
    "grades": [
        {"id": "g1", "prompt": "Say hi", "responses": ["hi!", "go away", "hello"],
         "grades": [0, 2, 1], "ranking": [], "lang": "en", "source": ""},
        {"id": "g2", "prompt": "打个招呼", "responses": ["你好", "走开"], "grades": [0, 2],
         "ranking": [], "lang": "zh", "source": ""},
    ],
    "feedback": [
        {"id": "f1", "prompt": "Tell me a joke", "response": "Why did the chicken...",
         "label": 1, "lang": "en", "source": ""},
        {"id": "f2", "prompt": "讲个笑话", "response": "不要。", "label": 0, "lang": "zh",
         "source": ""},
    ],
    "messages": [
        {"id": "m1", "messages": GOOD["messages"][0]["messages"], "lang": "en", "source": ""},
        {"id": "m2", "messages": GOOD["messages"][1]["messages"], "lang": "zh", "source": ""},
    ],
}


@pytest.mark.parametrize("fmt", sorted(GOOD))
def test_good_file_round_trips(tmp_path, fmt):
  path = write_jsonl(tmp_path / f"{fmt}.jsonl", GOOD[fmt] + [""])  # a blank line is fine
  data_dir = str(tmp_path / "tfds")
  name = jsonl.import_jsonl(path, fmt, config="mine", data_dir=data_dir, fractions=(1, 0, 0))
  assert name == f"{jsonl.DATASET_OF_FORMAT[fmt]}/mine"
  assert read_back(name, data_dir) == EXPECTED[fmt]
  leftovers = [p for p in os.listdir(data_dir) if p.startswith(".tmp")]
  assert not leftovers
  with pytest.raises(FileExistsError):
    jsonl.import_jsonl(path, fmt, config="mine", data_dir=data_dir)
  jsonl.import_jsonl(path, fmt, config="mine", data_dir=data_dir, overwrite=True)
  assert len(read_back(name, data_dir)) == 2


BAD = [  # (format, line, field named in the error, words in the problem)
    ("pairs", '{"prompt": "q", "chosen": "a", ', "<line>", "invalid JSON"),
    ("pairs", '["not", "an", "object"]', "<line>", "expected a JSON object"),
    ("pairs", {"prompt": "q", "chosen": "a"}, "rejected", "missing field"),
    ("pairs", {"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "empty prompt"),
    ("pairs", {"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "duplicate"),
    ("pairs", {"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "wrong type"),
    ("pairs", {"chosen": "no tags", "rejected": "b"}, "chosen", "HH transcript"),
    ("rankings", {"prompt": "q", "responses": ["a"], "ranking": [0]}, "responses", "K < 2"),
    ("rankings", {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 0]}, "ranking[1]",
     "duplicate"),
    ("rankings", {"prompt": "q", "responses": ["a", "a"], "ranking": [0, 1]}, "responses[1]",
     "duplicate answer"),
    ("rankings", {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 2]}, "ranking[1]",
     "not a response index"),
    ("rankings", {"prompt": "q", "responses": "a b", "ranking": [0, 1]}, "responses",
     "wrong type"),
    ("grades", {"prompt": "q", "responses": ["a", "b"], "grades": ["good", "excellent"]},
     "grades[1]", "not an allowed grade"),
    ("grades", {"prompt": "q", "responses": ["a", "b"], "grades": [0, 3]}, "grades[1]",
     "not an allowed grade"),
    ("grades", {"prompt": "q", "responses": ["a", "b"], "grades": ["good"]}, "grades",
     "1 entries for 2"),
    ("grades", {"responses": ["a", "b"], "grades": [0, 1]}, "prompt", "missing field"),
    ("feedback", {"prompt": "q", "completion": "a", "label": 2}, "label", "not a thumb"),
    ("feedback", {"prompt": "q", "completion": "a", "label": 1, "lang": "fr"}, "lang",
     "not one of"),
    ("feedback", {"prompt": "", "completion": "a", "label": 1}, "prompt", "empty prompt"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "messages",
     "no assistant turn"),
    ("messages", {"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role",
     "not allowed"),
    ("messages", {"messages": [{"role": "user"}]}, "messages[0].content", "missing field"),
    ("messages", {"messages": "hi"}, "messages", "non-empty list"),
]


@pytest.mark.parametrize("fmt, line, field, problem", BAD)
def test_each_malformed_line_is_reported_and_nothing_written(tmp_path, fmt, line, field,
                                                             problem):
  path = write_jsonl(tmp_path / "in.jsonl", GOOD[fmt] + [line])
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(jsonl.JsonlError) as e:
    jsonl.import_jsonl(path, fmt, config="bad", data_dir=data_dir)
  assert e.value.errors == [e.value.errors[0]]
  assert e.value.errors[0].startswith(f"{path}:3: field {field!r}: ")
  assert problem in e.value.errors[0]
  assert not os.path.exists(data_dir)


def test_all_bad_lines_are_listed(tmp_path):
  lines = [GOOD["grades"][0], "{oops", {"prompt": "q", "responses": ["a"], "grades": [0]},
           GOOD["grades"][1], {"prompt": "q", "responses": ["a", "b"], "grades": ["ok", 0]}]
  path = write_jsonl(tmp_path / "in.jsonl", lines)
  with pytest.raises(jsonl.JsonlError) as e:
    jsonl.import_jsonl(path, "grades", config="bad", data_dir=str(tmp_path / "tfds"))
  assert [err.split(": field")[0] for err in e.value.errors] == [
      f"{path}:2", f"{path}:3", f"{path}:5"]
  assert "3 malformed" in str(e.value)


def test_duplicate_ids_are_rejected(tmp_path):
  path = write_jsonl(tmp_path / "in.jsonl", [GOOD["feedback"][0], GOOD["feedback"][0]])
  with pytest.raises(jsonl.JsonlError, match=r"in.jsonl:2: field 'id': duplicate id"):
    jsonl.read_jsonl(path, "feedback")


def test_write_comparisons_from_memory(tmp_path):
  data_dir = str(tmp_path / "workdir" / "tfds")
  records = [{"prompt": f"prompt {i}", "responses": ["good one", "meh", "bad"],
              "grades": ["good", "average", "poor"] if i % 2 else [1, 0, 2]}
             for i in range(30)]
  path = builders.write_comparisons(records, config="round0", data_dir=data_dir)
  assert path == os.path.join(data_dir, "rlhf_comparisons", "round0")
  got = read_back("rlhf_comparisons/round0", data_dir)
  assert len(got) == 30 and {r["lang"] for r in got} == {"en"}
  assert sorted(builders.comparison_pairs(got[0])) in ([(0, 1), (0, 2), (1, 2)],
                                                       [(0, 2), (1, 0), (1, 2)])
  with pytest.raises(jsonl.JsonlError, match=r"<round1>:1: field 'grades\[0\]'"):
    builders.write_comparisons([records[0], {**records[1], "grades": ["great", 0, 1]}],
                               config="round1", data_dir=data_dir)
  assert not os.path.exists(os.path.join(data_dir, "rlhf_comparisons", "round1"))


def test_comparison_pairs():
  assert builders.comparison_pairs({"grades": [1, 0, 1], "ranking": []}) == [(1, 0), (1, 2)]
  assert builders.comparison_pairs({"grades": [], "ranking": [2, 0, 1]}) == [
      (2, 0), (2, 1), (0, 1)]


def test_cli(tmp_path, capsys):
  path = write_jsonl(tmp_path / "in.jsonl", GOOD["messages"])
  jsonl.main([path, "--format=messages", "--config=cli", f"--data_dir={tmp_path}/tfds",
              "--seed=3"])
  assert "rlhf_dialogues/cli" in capsys.readouterr().out
  bad = write_jsonl(tmp_path / "bad.jsonl", ["{"])
  with pytest.raises(SystemExit, match="bad.jsonl:1"):
    jsonl.main([bad, "--format=messages", "--config=x", f"--data_dir={tmp_path}/tfds"])


def test_bad_bytes_and_deep_nesting_name_the_file_and_line(tmp_path):
  """Invalid UTF-8 and JSON nested deeper than Python parses are reported per line, like any
  malformed line, instead of a raw UnicodeDecodeError / RecursionError; nothing is written."""
  path = str(tmp_path / "in.jsonl")
  good = json.dumps(GOOD["feedback"][0], ensure_ascii=False).encode()
  with open(path, "wb") as f:
    f.write(good + b"\n" + b'{"prompt": "caf\xe9"}\n' + b"[" * 100000 + b"]" * 100000 + b"\n")
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(jsonl.JsonlError) as e:
    jsonl.import_jsonl(path, "feedback", config="bad", data_dir=data_dir)
  assert e.value.errors[0] == f"{path}:2: field '<line>': not UTF-8 (byte 0xe9 at column 16)"
  assert e.value.errors[1].startswith(f"{path}:3: field '<line>': JSON nested too deeply")
  assert not os.path.exists(data_dir)
