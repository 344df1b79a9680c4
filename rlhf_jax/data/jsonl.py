"""Importers for the JSONL layouts preference and chat data usually come in.

| format        | one line                                              | written as          |
|---------------|-------------------------------------------------------|---------------------|
| `pairs`       | {prompt, chosen, rejected}, or HH-RLHF's {chosen,     | rlhf_comparisons    |
|               |  rejected} transcripts ("\\n\\nHuman: ..\\n\\nAssistant: ..") |               |
| `rankings`    | {prompt, responses: [K str], ranking: [K indices,     | rlhf_comparisons    |
|               |  best first]}                                         |                     |
| `grades`      | {prompt, responses: [K str], grades: ["good" |         | rlhf_comparisons    |
|               |  "average" | "poor" (or 0 | 1 | 2)]}                  |                     |
| `feedback`    | {prompt, completion, label: 1/0 or true/false}        | rlhf_feedback       |
| `messages`    | {messages: [{role: system|user|assistant, content}]}  | rlhf_dialogues      |

Every line may also carry `id`, `lang` ('en' or 'zh'; guessed from the text when absent) and
`source`. Every line is checked before anything is written; a bad file raises JsonlError
listing each malformed line as `file:line: field: problem`, and leaves data_dir untouched.
A good file becomes `<dataset>/<config>` in data_dir, the name to give `config.data.name`:

    python -m rlhf_jax.data.jsonl --format=pairs --config=hh --data_dir=DIR hh.jsonl
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Iterable, Sequence

from rlhf_jax.core.langs import LANGS
from rlhf_jax.data import builders, sources

DATASET_OF_FORMAT = {
    "pairs": "rlhf_comparisons",
    "rankings": "rlhf_comparisons",
    "grades": "rlhf_comparisons",
    "comparisons": "rlhf_comparisons",  # grades or ranking: what the grading stage hands in
    "feedback": "rlhf_feedback",
    "messages": "rlhf_dialogues",
}
MAX_REPORTED = 50  # Errors shown in the exception message (all are kept in `.errors`).


class FieldError(ValueError):
  """One bad field of one record."""

  def __init__(self, field: str, problem: str):
    super().__init__(f"field {field!r}: {problem}")
    self.field, self.problem = field, problem


class JsonlError(ValueError):
  """Malformed input: `.errors` lists every bad line as 'file:line: field ...: problem'."""

  def __init__(self, errors: list[str], what: str):
    shown = "\n  ".join(errors[:MAX_REPORTED])
    more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
    super().__init__(f"{len(errors)} malformed record(s) in {what}; nothing was written:\n  "
                     f"{shown}{more}")
    self.errors = errors


# ---------------------------------------------------------------------------------------------
# Field checks.


def _field(obj: dict[str, Any], name: str) -> Any:
  if name not in obj:
    raise FieldError(name, "missing field")
  return obj[name]


def _string(value: Any, name: str, *, empty_ok: bool = False) -> str:
  if not isinstance(value, str):
    raise FieldError(name, f"wrong type: expected a string, got {type(value).__name__}")
  if not empty_ok and not value.strip():
    raise FieldError(name, "empty")
  return value


def _prompt(obj: dict[str, Any]) -> str:
  value = _field(obj, "prompt")
  if isinstance(value, str) and not value.strip():
    raise FieldError("prompt", "empty prompt")
  return _string(value, "prompt")


def _responses(obj: dict[str, Any]) -> list[str]:
  value = _field(obj, "responses")
  if not isinstance(value, list):
    raise FieldError("responses", f"wrong type: expected a list, got {type(value).__name__}")
  if len(value) < 2:
    raise FieldError("responses", f"K < 2: a comparison needs at least 2 answers, got "
                     f"{len(value)}")
  out = [_string(v, f"responses[{i}]") for i, v in enumerate(value)]
  seen: dict[str, int] = {}
  for i, response in enumerate(out):
    if response in seen:
      raise FieldError(f"responses[{i}]", f"duplicate answer (same as responses[{seen[response]}])")
    seen[response] = i
  return out


def _int_list(obj: dict[str, Any], name: str) -> list[Any]:
  value = _field(obj, name)
  if not isinstance(value, list):
    raise FieldError(name, f"wrong type: expected a list, got {type(value).__name__}")
  return value


def _ranking(obj: dict[str, Any], k: int) -> list[int]:
  ranking = _int_list(obj, "ranking")
  if len(ranking) != k:
    raise FieldError("ranking", f"has {len(ranking)} entries for {k} responses")
  seen = set()
  for i, r in enumerate(ranking):
    if not isinstance(r, int) or isinstance(r, bool):
      raise FieldError(f"ranking[{i}]", f"wrong type: expected an int, got {type(r).__name__}")
    if not 0 <= r < k:
      raise FieldError(f"ranking[{i}]", f"index {r} is not a response index in [0, {k})")
    if r in seen:
      raise FieldError(f"ranking[{i}]", f"duplicate answer: response {r} is ranked twice")
    seen.add(r)
  return ranking


def _grades(obj: dict[str, Any], k: int) -> list[int]:
  grades = _int_list(obj, "grades")
  if len(grades) != k:
    raise FieldError("grades", f"has {len(grades)} entries for {k} responses")
  out = []
  for i, g in enumerate(grades):
    if isinstance(g, str) and g in builders.GRADES:
      out.append(builders.GRADES.index(g))
    elif isinstance(g, int) and not isinstance(g, bool) and 0 <= g < len(builders.GRADES):
      out.append(g)
    else:
      raise FieldError(f"grades[{i}]", f"{g!r} is not an allowed grade "
                       f"({', '.join(builders.GRADES)}, or 0-2)")
  return out


def _label(obj: dict[str, Any]) -> int:
  label = _field(obj, "label")
  if isinstance(label, bool):
    return int(label)
  if isinstance(label, int) and label in (0, 1):
    return label
  raise FieldError("label", f"{label!r} is not a thumb: expected 1/0 or true/false")


def _common(obj: dict[str, Any], text: str) -> dict[str, Any]:
  """The optional id / lang / source fields, checked; lang guessed from `text` if absent."""
  out: dict[str, Any] = {}
  if "id" in obj:
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
      raise FieldError("id", f"wrong type: expected a string or int, got "
                       f"{type(obj['id']).__name__}")
    out["id"] = str(obj["id"])
  lang = obj.get("lang")
  if lang is None:
    lang = sources.guess_lang(text)
  elif lang not in LANGS:
    raise FieldError("lang", f"{lang!r} is not one of {LANGS}")
  out["lang"] = lang
  out["source"] = _string(obj.get("source", ""), "source", empty_ok=True)
  return out


# ---------------------------------------------------------------------------------------------
# Formats: a raw line's object -> the dataset's record.

_HUMAN, _ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def _split_transcript(transcript: str, name: str) -> tuple[str, str]:
  """(prompt, answer) of an HH-RLHF transcript: the answer follows the last Assistant tag."""
  cut = transcript.rfind(_ASSISTANT)
  if cut < 0:
    raise FieldError(name, "no prompt field, and not an HH transcript (no '\\n\\nAssistant:')")
  return transcript[:cut], transcript[cut + len(_ASSISTANT):].strip()


def _hh_prompt(prefix: str) -> str:
  """A single-turn transcript's question alone; a multi-turn history stays a transcript."""
  body = prefix[len(_HUMAN):] if prefix.startswith(_HUMAN) else prefix
  if _HUMAN in body or _ASSISTANT in body:
    return prefix.strip()
  return body.strip()


def check_pairs(obj: dict[str, Any]) -> dict[str, Any]:
  chosen = _string(_field(obj, "chosen"), "chosen")
  rejected = _string(_field(obj, "rejected"), "rejected")
  if "prompt" in obj:
    prompt = _prompt(obj)
  else:
    prefix, chosen = _split_transcript(chosen, "chosen")
    rejected_prefix, rejected = _split_transcript(rejected, "rejected")
    if rejected_prefix != prefix:
      raise FieldError("rejected", "its conversation before the answer differs from chosen's")
    prompt = _hh_prompt(prefix)
    if not prompt:
      raise FieldError("chosen", "empty prompt")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
      if not answer:
        raise FieldError(name, "empty answer after the last Assistant tag")
  if chosen == rejected:
    raise FieldError("rejected", "duplicate answer: same as chosen")
  return {"prompt": prompt, "responses": [chosen, rejected], "grades": [], "ranking": [0, 1],
          **_common(obj, prompt)}


def check_rankings(obj: dict[str, Any]) -> dict[str, Any]:
  prompt = _prompt(obj)
  responses = _responses(obj)
  return {"prompt": prompt, "responses": responses, "grades": [],
          "ranking": _ranking(obj, len(responses)), **_common(obj, prompt)}


def check_grades(obj: dict[str, Any]) -> dict[str, Any]:
  prompt = _prompt(obj)
  responses = _responses(obj)
  return {"prompt": prompt, "responses": responses, "grades": _grades(obj, len(responses)),
          "ranking": [], **_common(obj, prompt)}


def check_comparisons(obj: dict[str, Any]) -> dict[str, Any]:
  has_grades, has_ranking = bool(obj.get("grades")), bool(obj.get("ranking"))
  if has_grades == has_ranking:
    raise FieldError("grades", "need exactly one of grades and ranking")
  return check_grades(obj) if has_grades else check_rankings(obj)


def check_feedback(obj: dict[str, Any]) -> dict[str, Any]:
  prompt = _prompt(obj)
  response = _string(_field(obj, "completion"), "completion")
  return {"prompt": prompt, "response": response, "label": _label(obj),
          **_common(obj, prompt)}


def check_messages(obj: dict[str, Any]) -> dict[str, Any]:
  messages = _field(obj, "messages")
  if not isinstance(messages, list) or not messages:
    raise FieldError("messages", "expected a non-empty list of {role, content}")
  out = []
  for i, message in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(message, dict):
      raise FieldError(where, f"wrong type: expected an object, got {type(message).__name__}")
    if "role" not in message:
      raise FieldError(f"{where}.role", "missing field")
    role = _string(message["role"], f"{where}.role")
    if role not in builders.ROLES or (role == "system" and i > 0):
      raise FieldError(f"{where}.role", f"{role!r} is not allowed here (system only first, "
                       f"then user / assistant)")
    if "content" not in message:
      raise FieldError(f"{where}.content", "missing field")
    out.append({"role": role, "content": _string(message["content"], f"{where}.content")})
  turns = [m["role"] for m in out if m["role"] != "system"]
  if not turns or turns[0] != "user":
    raise FieldError("messages", "the first turn after any system message must be the user's "
                     "(it is the prompt)")
  if "assistant" not in turns:
    raise FieldError("messages", "no assistant turn: nothing to learn from")
  first_user = next(m["content"] for m in out if m["role"] == "user")
  return {"messages": out, **_common(obj, first_user)}


CHECKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "pairs": check_pairs,
    "rankings": check_rankings,
    "grades": check_grades,
    "comparisons": check_comparisons,
    "feedback": check_feedback,
    "messages": check_messages,
}


def _check_unique_id(record: dict[str, Any], ids: dict[str, Any], where: Any) -> None:
  """Ids key the TFDS examples, so two records may not share one."""
  if "id" not in record:
    return
  if record["id"] in ids:
    raise FieldError("id", f"duplicate id {record['id']!r} (first at {ids[record['id']]})")
  ids[record["id"]] = where


def _check(obj: Any, fmt: str) -> dict[str, Any]:
  if not isinstance(obj, dict):
    raise FieldError("<line>", f"wrong type: expected a JSON object, got {type(obj).__name__}")
  return CHECKS[fmt](obj)


def _check_format(fmt: str) -> None:
  if fmt not in CHECKS:
    raise ValueError(f"unknown format {fmt!r}; known: {sorted(CHECKS)}")


# ---------------------------------------------------------------------------------------------
# Files and records.


def validate_records(records: Sequence[Any], fmt: str, *, origin: str = "<records>"
                     ) -> list[dict[str, Any]]:
  """In-memory records (already parsed) -> checked records, or JsonlError naming each index."""
  _check_format(fmt)
  out, errors, ids = [], [], {}
  for i, obj in enumerate(records):
    try:
      record = _check(obj, fmt)
      _check_unique_id(record, ids, i)
      out.append(record)
    except FieldError as e:
      errors.append(f"{origin}:{i}: {e}")
  if errors:
    raise JsonlError(errors, origin)
  return out


def _parse_line(raw: bytes, where: str, errors: list) -> Any:
  """The JSON value of one line, or None (blank, or an error appended to `errors` as
  'file:line: ...'): bad UTF-8 and nesting too deep to parse are reported like bad JSON."""
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    errors.append(f"{where}: field '<line>': not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                  f"{e.start + 1})")
    return None
  if not line.strip():
    return None
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    errors.append(f"{where}: field '<line>': invalid JSON: {e}")
  except RecursionError:
    errors.append(f"{where}: field '<line>': JSON nested too deeply to read")
  return None


def read_jsonl(paths: str | Sequence[str], fmt: str) -> list[dict[str, Any]]:
  """Reads and checks every line of every file; JsonlError lists all malformed lines.

  Blank lines are skipped. A record without an id gets `<file index>:<line>`.
  """
  _check_format(fmt)
  paths = [paths] if isinstance(paths, str) else list(paths)
  out, errors, ids = [], [], {}
  for file_index, path in enumerate(paths):
    with open(path, "rb") as f:
      for line_no, raw in enumerate(f, 1):
        obj = _parse_line(raw, f"{path}:{line_no}", errors)
        if obj is None:
          continue
        try:
          record = _check(obj, fmt)
          record.setdefault("id", f"{file_index}:{line_no}")
          _check_unique_id(record, ids, f"{path}:{line_no}")
        except FieldError as e:
          errors.append(f"{path}:{line_no}: {e}")
          continue
        out.append(record)
  if errors:
    raise JsonlError(errors, ", ".join(paths))
  if not out:
    raise JsonlError([f"{', '.join(paths)}: no records"], ", ".join(paths))
  return out


def import_jsonl(paths: str | Sequence[str], fmt: str, *, config: str,
                 data_dir: str | None = None, seed: int = builders.DEFAULT_SPLIT_SEED,
                 fractions: Iterable[float] = builders.DEFAULT_FRACTIONS,
                 overwrite: bool = False) -> str:
  """Checks the files, then writes them as one TFDS dataset; returns its name
  ('<dataset>/<config>') for `config.data.name`. All or nothing."""
  records = read_jsonl(paths, fmt)
  dataset = DATASET_OF_FORMAT[fmt]
  builders.write_records(dataset, records, config=config, data_dir=data_dir, seed=seed,
                         fractions=tuple(fractions), overwrite=overwrite,
                         description=f"imported from {fmt} JSONL: {paths}")
  return f"{dataset}/{config}"


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Import JSONL into a TFDS dataset.")
  parser.add_argument("paths", nargs="+")
  parser.add_argument("--format", required=True, choices=sorted(CHECKS))
  parser.add_argument("--config", required=True, help="config name, e.g. 'hh'")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--seed", type=int, default=builders.DEFAULT_SPLIT_SEED)
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  try:
    name = import_jsonl(args.paths, args.format, config=args.config, data_dir=args.data_dir,
                        seed=args.seed, overwrite=args.overwrite)
  except JsonlError as e:
    raise SystemExit(str(e)) from None
  print(f"wrote {name} to {builders.resolve_data_dir(args.data_dir)}")


if __name__ == "__main__":
  main()
