"""TFDS builders for every dataset of the recipe, written as array_record (no TensorFlow needed).

  dataset            record                                                   stage
  rlhf_text          {id, text, lang, source}                                 pretraining
  rlhf_dialogues     {id, messages: [{role, content}], lang, source}          SFT
  rlhf_prompts       {id, prompt, lang, source}                               RM, PPO
  rlhf_feedback      {id, prompt, response, label (1 like / 0 dislike),       KTO
                      lang, source}
  rlhf_comparisons   {id, prompt, responses: [str], grades: [int],            RM
                      ranking: [int], lang, source}

Comparisons: `grades[i]` is response i's grade (0 good, 1 average, 2 poor), `ranking` lists
response indices best first; a record has one of the two (the other is empty) and
`comparison_pairs` turns either into the (better, worse) pairs the reward model trains on.

Every builder has configs. `bundled` (the default, absent for comparisons) reads the installed
packages through `sources.py`; any other config name holds records handed in by the caller
(`write_records`, used by the JSONL importers and by the stage that grades sampled answers), so
`rlhf_dialogues/my_chats` or `rlhf_comparisons/round0` can be named in `config.data.name` and
read back with `tfds.data_source(name, data_dir=..., split=...)` -- in a process that never
imported this module, too: TFDS reads prepared datasets from their files.

Splits (train / validation / test, 90/5/5 by default) come from hashing each record's split key
(the prompt, or a conversation's first user turn) with a fixed seed, so they are deterministic,
stable when records are added, and no prompt is in two splits. A split left empty is not
written (TFDS cannot write one); reading it raises an error naming the dataset and split.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.core import metrics
from rlhf_jax.data import sources

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.9, 0.05, 0.05)
DEFAULT_SPLIT_SEED = 0
BUNDLED = "bundled"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "rlhf_jax", "tfds")
GRADES = ("good", "average", "poor")  # grade value = index: 0 good, 1 average, 2 poor
ROLES = ("system", "user", "assistant")


def resolve_data_dir(data_dir: str | None = None) -> str:
  """The TFDS data_dir to use: the caller's (config.data.data_dir), else the user cache."""
  return os.path.abspath(os.path.expanduser(data_dir or DEFAULT_DATA_DIR))


# ---------------------------------------------------------------------------------------------
# Splits.


def assign_split(key: str, seed: int = DEFAULT_SPLIT_SEED,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
  """The split of a split key: a hash of (seed, normalized key) placed on [0, 1).

  A hash rather than a shuffled list: a key's split depends on nothing but the key and seed,
  so adding records never moves an old one to another split.
  """
  digest = hashlib.sha256(f"{seed}\x00{sources.normalize_key(key)}".encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  edge = 0.0
  for split, fraction in zip(SPLITS, fractions):
    edge += fraction
    if u < edge:
      return split
  return SPLITS[-1]


def default_split_key(record: dict[str, Any]) -> str:
  """Prompt, else first user turn, else text: what two records must share to share a split."""
  if record.get("prompt"):
    return record["prompt"]
  for message in record.get("messages") or ():
    if message["role"] == "user":
      return message["content"]
  return record.get("text") or record["id"]


def comparison_pairs(record: dict[str, Any]) -> list[tuple[int, int]]:
  """(better, worse) response-index pairs implied by a comparison's grades or ranking.

  Grades give every pair with different grades (ties imply nothing); a ranking of K answers
  gives all K(K-1)/2 pairs.
  """
  grades, ranking = list(record.get("grades") or ()), list(record.get("ranking") or ())
  if ranking:
    return [(ranking[i], ranking[j]) for i in range(len(ranking))
            for j in range(i + 1, len(ranking))]
  return [(i, j) for i in range(len(grades)) for j in range(len(grades))
          if grades[i] < grades[j]]


# ---------------------------------------------------------------------------------------------
# Builders.


@dataclasses.dataclass(eq=False)
class RlhfConfig(tfds.core.BuilderConfig):
  """A builder config: `records_path` None reads the bundled sources, else a JSONL of records.

  The JSONL holds records already in the dataset's schema (plus optional `split_key`);
  `write_records` writes it, builds, and deletes it.
  """
  records_path: str | None = None
  split_seed: int = DEFAULT_SPLIT_SEED
  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS


def _text() -> tfds.features.Text:
  return tfds.features.Text()


class _RlhfBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared generation: records (bundled or JSONL) -> hashed splits -> examples keyed by id."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [RlhfConfig(name=BUNDLED, description="the installed data packages")]
  FEATURES: dict[str, Any] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=type(self).__doc__,
        features=tfds.features.FeaturesDict(dict(self.FEATURES)),
        metadata=tfds.core.MetadataDict(),
    )

  def _records(self) -> Iterable[dict[str, Any]]:
    config = self.builder_config
    if config.records_path:
      return metrics.read_json_lines(config.records_path)
    if config.name != BUNDLED or self.name not in sources.RECORD_MAKERS:
      raise ValueError(f"{self.name}/{config.name} has no bundled source: write its records "
                       f"with rlhf_jax.data.builders.write_records or rlhf_jax.data.jsonl")
    stats: collections.Counter = collections.Counter()
    records = list(sources.RECORD_MAKERS[self.name](stats))
    self.info.metadata["source_stats"] = dict(sorted(stats.items()))
    return records

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded: every source is local.
    config = self.builder_config
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for record in self._records():
      record = dict(record)
      key = record.pop("split_key", None) or default_split_key(record)
      by_split[assign_split(key, config.split_seed, config.fractions)].append(record)
    self.info.metadata["split_seed"] = config.split_seed
    return {split: self._generate_examples(records)
            for split, records in by_split.items() if records}

  def _generate_examples(self, records):
    names = set(self.FEATURES)
    for record in records:
      yield record["id"], {k: v for k, v in record.items() if k in names}


class RlhfText(_RlhfBuilder):
  """Pretraining text, English and Chinese: {id, text, lang, source}.

  Bundled: every Chit-Chat conversation (one-sided ones too) and chatterbot exchange, turns
  joined by newlines; People's Daily paragraphs; deduplicated product reviews. Records
  (train / validation / test): en 7,091 / 347 / 296, zh 33,573 / 1,802 / 1,996.
  """
  FEATURES = {"id": _text(), "text": _text(), "lang": _text(), "source": _text()}


class RlhfDialogues(_RlhfBuilder):
  """SFT demonstrations: {id, messages: [{role, content}], lang, source}.

  Bundled: two-sided Chit-Chat conversations and chatterbot exchanges, user first, ending on
  an answer. Records (train / validation / test): en 4,205 / 202 / 176, zh 438 / 15 / 24.
  """
  FEATURES = {"id": _text(),
              "messages": tfds.features.Sequence({"role": _text(), "content": _text()}),
              "lang": _text(), "source": _text()}


class RlhfPrompts(_RlhfBuilder):
  """Prompts for the reward model and PPO: {id, prompt, lang, source}.

  Bundled (see sources.prompt_records), deduplicated. Records (train / validation / test):
  en 2,880 / 178 / 164, zh 12,113 / 632 / 669 (zh: 377 chatterbot questions, the rest
  product reviews; filter on `source` for questions only).
  """
  FEATURES = {"id": _text(), "prompt": _text(), "lang": _text(), "source": _text()}


class RlhfFeedback(_RlhfBuilder):
  """Single-answer thumbs: {id, prompt, response, label (1 like / 0 dislike), lang, source}.

  Bundled: Chit-Chat Challenge conversations with human ratings (three 1-10 sliders, witty /
  upbeat / interesting, default 5). Mean >= 8 is a like, mean <= 3 a dislike, the rest (the
  untouched 5/5/5 included) is left out; the thumb goes on the opening exchange (first user
  turn, first answer). Of 4,017 two-sided conversations: 1,413 likes, 140 dislikes, 2,151 with
  no verdict, 313 unrated. Records (train / validation / test): 1,410 / 73 / 70, of which
  likes 1,284 / 69 / 60. English only: no Chinese source has human ratings.
  """
  FEATURES = {"id": _text(), "prompt": _text(), "response": _text(), "label": np.int32,
              "lang": _text(), "source": _text()}


class RlhfComparisons(_RlhfBuilder):
  """K answers to one prompt, graded (0 good, 1 average, 2 poor) or ranked (indices, best first).

  No bundled source: records come from the caller (`write_records` / `rlhf_jax.data.jsonl`),
  typically the stage that samples answers and has annotators grade them, written into the
  run's workdir.
  """
  BUILDER_CONFIGS = []
  FEATURES = {"id": _text(), "prompt": _text(),
              "responses": tfds.features.Sequence(_text()),
              "grades": tfds.features.Sequence(np.int32),
              "ranking": tfds.features.Sequence(np.int32),
              "lang": _text(), "source": _text()}


BUILDERS: dict[str, type[_RlhfBuilder]] = {
    "rlhf_text": RlhfText,
    "rlhf_dialogues": RlhfDialogues,
    "rlhf_prompts": RlhfPrompts,
    "rlhf_feedback": RlhfFeedback,
    "rlhf_comparisons": RlhfComparisons,
}
BUNDLED_DATASETS = tuple(sources.RECORD_MAKERS)


def prepare(names: Sequence[str] | None = None, *, data_dir: str | None = None
            ) -> dict[str, tfds.core.DatasetBuilder]:
  """Prepares the bundled datasets (all by default) into data_dir; prepared ones are reused."""
  data_dir = resolve_data_dir(data_dir)
  builders = {}
  for name in names or BUNDLED_DATASETS:
    if name not in BUNDLED_DATASETS:
      raise ValueError(f"{name!r} has no bundled source; bundled: {BUNDLED_DATASETS}")
    builder = BUILDERS[name](data_dir=data_dir, config=BUNDLED)
    _prepare(builder)
    builders[name] = builder
  return builders


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
  """download_and_prepare as array_record, never asking GCS for a prepared copy."""
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def open_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The builder of a prepared dataset ('rlhf_text', 'rlhf_comparisons/round0', ...).

  A bundled dataset that is not prepared yet is prepared first (a minute at most, offline);
  any other missing dataset is a ValueError saying how to make it.
  """
  data_dir = resolve_data_dir(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for unknown names and configs.
    raise ValueError(f"dataset {name!r} is not prepared in {data_dir} and has no bundled "
                     f"source; write it with rlhf_jax.data.jsonl or builders.write_records "
                     f"({type(e).__name__}: {str(e)[:300]})") from e
  if not builder.is_prepared():
    config = builder.builder_config.name if builder.builder_config else None
    if config != BUNDLED:
      raise ValueError(f"dataset {name!r} is not prepared in {data_dir}")
    logging.info("preparing %s into %s", name, data_dir)
    _prepare(builder)
  return builder


# ---------------------------------------------------------------------------------------------
# Caller-provided records.

_REQUIRED = {
    "rlhf_text": ("text",),
    "rlhf_dialogues": ("messages",),
    "rlhf_prompts": ("prompt",),
    "rlhf_feedback": ("prompt", "response", "label"),
    "rlhf_comparisons": ("prompt", "responses"),
}


def _complete_record(dataset: str, index: int, record: dict[str, Any]) -> dict[str, Any]:
  """The record with defaults filled in: id, lang (guessed from the text), source, and for
  comparisons the empty one of grades / ranking. Records must already be valid (jsonl.py
  checks them field by field); this only catches a missing field early."""
  missing = [k for k in _REQUIRED[dataset] if k not in record]
  if missing:
    raise ValueError(f"{dataset} record {index} lacks {missing}: {str(record)[:200]}")
  out = dict(record)
  out.setdefault("id", str(index))
  out["id"] = str(out["id"])
  if not out.get("lang"):
    out["lang"] = sources.guess_lang(default_split_key(out))
  out.setdefault("source", "")
  if dataset == "rlhf_comparisons":
    out.setdefault("grades", [])
    out.setdefault("ranking", [])
  return out


def _move_prepared(tmp_data_dir: str, data_dir: str, dataset: str, config: str,
                   overwrite: bool) -> str:
  """Moves <tmp>/<dataset>/<config> into data_dir with renames (atomic on one filesystem)."""
  src = os.path.join(tmp_data_dir, dataset, config)
  dst = os.path.join(data_dir, dataset, config)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if os.path.exists(dst):
    if not overwrite:
      raise FileExistsError(f"{dst} exists; pass overwrite=True to replace it")
    trash = os.path.join(tmp_data_dir, "replaced")
    os.replace(dst, trash)
  os.replace(src, dst)
  return dst


def write_records(dataset: str, records: Iterable[dict[str, Any]], *, config: str,
                  data_dir: str | None = None, seed: int = DEFAULT_SPLIT_SEED,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS, overwrite: bool = False,
                  description: str = "") -> str:
  """Writes records as `<dataset>/<config>` in data_dir; returns the prepared directory.

  All or nothing: the dataset is built in a temporary folder inside data_dir and renamed into
  place at the end, so an error leaves data_dir as it was. Records are trusted to be valid --
  use `rlhf_jax.data.jsonl` to check raw records first.
  """
  if dataset not in BUILDERS:
    raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(BUILDERS)}")
  if config == BUNDLED:
    raise ValueError(f"config name {BUNDLED!r} is reserved for the bundled sources")
  records = [_complete_record(dataset, i, r) for i, r in enumerate(records)]
  if not records:
    raise ValueError(f"no records to write for {dataset}/{config}")
  counts = collections.Counter(r["id"] for r in records)
  duplicates = [i for i, n in counts.items() if n > 1]
  if duplicates:
    raise ValueError(f"{dataset}/{config}: duplicate record ids {duplicates[:10]}")
  data_dir = resolve_data_dir(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{dataset}-{config}-", dir=data_dir)
  try:
    records_path = os.path.join(tmp, "records.jsonl")
    with open(records_path, "w", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    builder_config = RlhfConfig(name=config, description=description or None,
                                records_path=records_path, split_seed=seed,
                                fractions=tuple(fractions))
    tmp_data_dir = os.path.join(tmp, "tfds")
    _prepare(BUILDERS[dataset](data_dir=tmp_data_dir, config=builder_config))
    return _move_prepared(tmp_data_dir, data_dir, dataset, config, overwrite)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def write_comparisons(records: Iterable[dict[str, Any]], *, config: str,
                      data_dir: str | None = None, **kwargs) -> str:
  """Checks then writes comparison records {prompt, responses, grades | ranking, [lang]}.

  For the stage that samples K answers per prompt and has annotators grade them: grades may be
  ints (0 good, 1 average, 2 poor) or the strings; every bad record is reported before anything
  is written. `data_dir` is usually `<workdir>/tfds`.
  """
  from rlhf_jax.data import jsonl  # Late import: jsonl.py imports this module.
  checked = jsonl.validate_records(list(records), "comparisons", origin=f"<{config}>")
  return write_records("rlhf_comparisons", checked, config=config, data_dir=data_dir, **kwargs)
