"""Every file the project reads back names itself when its content is bad: `path[:line]: what is
wrong`, never a bare parser message (`Expecting value: line 1 column 1`), an AttributeError or
a RecursionError traceback. One case per reader and kind of damage: empty, garbage, the wrong
JSON type, invalid UTF-8, nesting too deep for the parser, a record without its key."""
import json
import os
import re

import pytest

from rlhf_jax.core import metrics, run_folder
from rlhf_jax.data import feedback, jsonl
from rlhf_jax.eval import report, report_run
from rlhf_jax.recipe import markers
from rlhf_jax.recipe.sweep import results as sweep_results, status as sweep_status

DEEP = b"[" * 100_000 + b"]" * 100_000  # past the parser's recursion limit
BAD_UTF8 = b'{"step": 1, "loss": "\xff\xfe"}'


def read_done(w):
  return markers.read_done(os.path.join(w, "sft"))


def read_metrics(w):
  return metrics.read_metrics(os.path.join(w, "sft"))


def read_summary(w):
  return report_run.read_json(os.path.join(w, "summary.json"))


def read_results(w):
  return report_run.read_json(os.path.join(w, "evaluate", "results.json"))


def write_report(w):
  return report.write_report(w)


def sweep_status_of(w):
  return sweep_status.run_status(w)


def sweep_settings(w):
  return sweep_status.read_json(os.path.join(w, sweep_status.RUN_FILE))


def sweep_metrics(w):
  return sweep_results.read_source(w, "ppo")


def sweep_results_file(w):
  return sweep_results.read_source(w, "results")


def run_record(w):
  return run_folder.read_record(os.path.join(w, "sft"))


def feedback_db(w):
  return feedback.FeedbackStore(os.path.join(w, "feedback", "feedback.sqlite"))


def import_feedback(w):
  return jsonl.read_jsonl(os.path.join(w, "feedback.jsonl"), "feedback")


# (reader, the file it reads relative to the workdir, the bytes written there, the line the
# message must name (None: a whole-file problem, no line), what the message must say).
CASES = [
    (read_done, "sft/DONE.json", b"", None, "not valid JSON"),
    (read_done, "sft/DONE.json", b"{garbage", None, "not valid JSON"),
    (read_done, "sft/DONE.json", b"[]", None, "expected a JSON object, got list"),
    (read_done, "sft/DONE.json", b"\xff\xfe{}", None, "not valid JSON"),
    (read_metrics, "sft/metrics.jsonl", b'{"step": 1}\n{"step": 2, "lo\n', 2, "not valid JSON"),
    (read_metrics, "sft/metrics.jsonl", b'{"step": 1}\n\n' + BAD_UTF8 + b"\n", 3, "not UTF-8"),
    (read_metrics, "sft/metrics.jsonl", b'{"step": 1}\n{"loss": 2.5}\n', 2,
     "without an integer 'step'"),
    (read_metrics, "sft/metrics.jsonl", b'{"step": 1}\n[1, 2]\n', 2, "expected a JSON object"),
    (read_metrics, "sft/metrics.jsonl", DEEP + b"\n", 1, "nested too deeply"),
    (read_summary, "summary.json", b'{"stages": {}}\n{"x": 1}', 2, "not valid JSON"),
    (read_summary, "summary.json", b"", 1, "not valid JSON"),
    (read_results, "evaluate/results.json", b"[]", None, "expected a JSON object, got list"),
    (read_results, "evaluate/results.json", BAD_UTF8, None, "not UTF-8"),
    (read_results, "evaluate/results.json", DEEP, None, "nested too deeply"),
    (write_report, "summary.json", b"{oops", 1, "not valid JSON"),
    (write_report, "comparisons/info.json", b'"text"', None, "expected a JSON object, got str"),
    (sweep_status_of, "summary.json", b"{", 1, "not valid JSON"),
    (sweep_settings, sweep_status.RUN_FILE, b"null", None, "expected a JSON object, got NoneType"),
    (sweep_metrics, "ppo/metrics.jsonl", b'{"step": 1}\n{bad}\n', 2, "not valid JSON"),
    (sweep_results_file, "evaluate/results.json", b"\xc3", None, "not UTF-8"),
    (run_record, "sft/run.json", b"{", None, "not a valid run record"),
    (run_record, "sft/run.json", b"[]", None, "not a run record"),
    (feedback_db, "feedback/feedback.sqlite", b"not a database " * 100, None,
     "not a feedback database"),
    (import_feedback, "feedback.jsonl", b"\n" + BAD_UTF8 + b"\n", 2, "not UTF-8"),
    (import_feedback, "feedback.jsonl", DEEP + b"\n", 1, "nested too deeply"),
]


@pytest.mark.parametrize("reader,name,content,line,what", CASES,
                         ids=[f"{c[0].__name__}-{i}" for i, c in enumerate(CASES)])
def test_bad_content_names_the_file_and_line(reader, name, content, line, what, tmp_path):
  path = tmp_path / name
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  with pytest.raises(ValueError) as caught:
    reader(str(tmp_path))
  where = re.escape(str(path)) + (f":{line}" if line is not None else "")
  # The location first (or first on a line of a list of problems), then what is wrong.
  assert re.search(rf"(^|\n\s*){where}: [^\n]*{re.escape(what)}", str(caught.value)), \
      str(caught.value)[:500]
  assert not isinstance(caught.value, (json.JSONDecodeError, UnicodeDecodeError))


def test_a_garbled_rm_normalization_names_its_file(tmp_path):
  from rlhf_jax.infer import rm_scores
  (tmp_path / rm_scores.NORMALIZATION_FILE).write_text("{")
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / rm_scores.NORMALIZATION_FILE))):
    rm_scores.read_normalization(str(tmp_path))


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
  """A run killed while appending to metrics.jsonl leaves half a line; the resumed run drops it
  (with the records after its checkpoint) instead of failing on it. Any other bad line is an
  error naming it, never silently dropped."""
  path = tmp_path / "metrics.jsonl"
  path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  metrics.MetricWriter(str(tmp_path), enabled=True).drop_after(2)
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2]
  assert path.read_bytes().endswith(b"}\n")
  # A complete last record only missing its newline is kept (and given one).
  path.write_bytes(b'{"step": 1}\n{"step": 2}')
  metrics.MetricWriter(str(tmp_path), enabled=True).drop_after(5)
  assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
  path.write_bytes(b'{"step": 1}\n{"st\n{"step": 2}\n')
  with pytest.raises(metrics.FileContentError, match=re.escape(f"{path}:2: not valid JSON")):
    metrics.MetricWriter(str(tmp_path), enabled=True).drop_after(1)


def test_garbled_hugging_face_files_name_themselves(tmp_path):
  """An imported model's JSON files (config.json, tokenizer_config.json, and the tokenizer.json
  the GGUF export reads) go through the same reader: `path:line: not valid JSON`."""
  from rlhf_jax.export import gguf_export
  from rlhf_jax.models import hf_configs
  from rlhf_jax.text import hf_tokenizer
  (tmp_path / "config.json").write_bytes(b'{"vocab_size":\n')
  with pytest.raises(metrics.FileContentError,
                     match=re.escape(f"{tmp_path / 'config.json'}:2: not valid JSON")):
    hf_configs.read_hf_config(str(tmp_path))
  (tmp_path / "tokenizer.json").write_bytes(b"{}")
  (tmp_path / "tokenizer_config.json").write_bytes(b"[1, 2")
  with pytest.raises(metrics.FileContentError,
                     match=re.escape(f"{tmp_path / 'tokenizer_config.json'}:1: not valid JSON")):
    hf_tokenizer.HFTokenizer.load(str(tmp_path))
  (tmp_path / "tokenizer.json").write_bytes(b"[]")
  with pytest.raises(metrics.FileContentError,
                     match=re.escape(f"{tmp_path / 'tokenizer.json'}: expected a JSON object")):
    gguf_export._bpe_metadata(None, None, str(tmp_path / "tokenizer.json"))


def test_metric_writer_writes_tensorboard_events_without_importing_torch(tmp_path):
  """TensorBoard events beside metrics.jsonl, through tensorboardX imported without torch
  (which it only needs for torch tensors, and which took 10 s to import). In a subprocess: the
  test session has imported torch already."""
  import subprocess
  import sys
  code = ("import sys; from rlhf_jax.core import metrics; "
          f"w = metrics.MetricWriter({str(tmp_path)!r}, enabled=True); "
          "w.write(3, {'train/loss': 1.25}); "
          "assert 'torch' not in sys.modules, 'torch was imported'; "
          "import importlib.util; assert importlib.util.find_spec('torch') is not None")
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ,
                                                                "JAX_PLATFORMS": "cpu"})
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and b"train/loss" in events[0].read_bytes()
  assert metrics.read_metrics(str(tmp_path))[0]["train/loss"] == 1.25
