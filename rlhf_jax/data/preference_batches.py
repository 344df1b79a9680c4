"""Batches for preference fine-tuning: liked / disliked answers (KTO) and answer pairs (DPO).

A batch element is one prompt with K answers (K = 1 for KTO, K = 2 = (chosen, rejected) for
DPO), each a row in the layout of rlhf_jax/infer/logprobs.py (left-padded prompt in P columns,
right-padded answer in N):

  tokens, positions, segment_ids  [B, K, P + N] int32
  answer_mask                     [B, K, N]     float32  1 on the answer's real tokens
  valid                           [B]           float32  1 = a real element (0: padding)
  label                           [B]           float32  KTO: 1 like, 0 dislike
  lang                            [B]           int32    index in LANGS, -1 for others

Where elements come from (`data.names`, several joined by '+', read in one shuffled stream):
  rlhf_feedback[/config]     KTO: every thumb. DPO: every (liked, disliked) pair of answers
                             to the same prompt (case and spacing aside); the bundled ratings
                             hold a few hundred such pairs, on greetings mostly.
  rlhf_comparisons/<config>  DPO: every (better, worse) pair the grades or ranking imply
                             (`builders.comparison_pairs`); pairs of identical answers are
                             dropped and counted. KTO does not read comparisons.

The stream is rm_inputs.ComparisonBatches over a table of (record, better, worse) indices into
the concatenated sources, so its checkpointed state is a few integers and a resumed run sees
exactly the batches it would have seen.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from rlhf_jax.core.langs import LANGS
from rlhf_jax.infer.logprobs import encode_prompt_answer, layout_rows
from rlhf_jax.data import rm_batches as rm_inputs
from rlhf_jax.data.pipeline import decode_record
from rlhf_jax.data.sources import normalize_key
from rlhf_jax.data.builders import comparison_pairs
from rlhf_jax.data.pipeline import load_source

log = logging.getLogger(__name__)

KINDS = ("kto", "dpo")
FEEDBACK, COMPARISONS = "rlhf_feedback", "rlhf_comparisons"


class NoFeedbackError(ValueError):
  """KTO data with no likes or no dislikes: the loss needs both to have a reference point."""


def parse_names(names: str | Sequence[str]) -> list[str]:
  """'a+b' (or a list) -> ['a', 'b']; an empty selection is an error."""
  if isinstance(names, str):
    names = names.split("+")
  out = [n.strip() for n in names if n and n.strip()]
  if not out:
    raise ValueError("data.names is empty: name at least one dataset (e.g. rlhf_feedback)")
  return out


def check_name(kind: str, name: str) -> str:
  """The dataset family of `name`, after checking the objective can read it."""
  family = name.split("/")[0]
  readable = {"kto": (FEEDBACK,), "dpo": (FEEDBACK, COMPARISONS)}[kind]
  if family not in readable:
    raise ValueError(f"{kind.upper()} reads {' or '.join(readable)} datasets, not {name!r}")
  return family


class ListSource:
  """Records held in memory, with the `__len__` / `__getitems__` of a TFDS data source."""

  def __init__(self, records: Sequence[dict]):
    self.records = list(records)

  def __len__(self) -> int:
    return len(self.records)

  def __getitems__(self, indices) -> list[dict]:
    return [self.records[int(i)] for i in indices]


class MixedSource:
  """Several sources read as one: index i is record i - offset of the source it falls in."""

  def __init__(self, sources: Sequence[Any]):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitems__(self, indices) -> list:
    indices = [int(i) for i in indices]
    which = np.searchsorted(self.offsets, indices, side="right") - 1
    out: list = [None] * len(indices)
    for s in set(which.tolist()):
      rows = [k for k, w in enumerate(which) if w == s]
      got = self.sources[s].__getitems__([indices[k] - int(self.offsets[s]) for k in rows])
      for k, record in zip(rows, got):
        out[k] = record
    return out


def read_all(source) -> list[dict]:
  out = []
  for start in range(0, len(source), 256):
    block = source.__getitems__(list(range(start, min(len(source), start + 256))))
    out.extend(decode_record(r) for r in block)
  return out


def feedback_pairs(records: Sequence[dict], origin: str) -> tuple[list[dict], int]:
  """Comparison records (chosen, rejected) from thumbs: every liked answer against every
  disliked answer to the same prompt (compared by `sources.normalize_key`); and the number
  of such pairs dropped because both answers are the same text."""
  groups: dict[str, dict[int, list[dict]]] = {}
  for r in records:
    groups.setdefault(normalize_key(r["prompt"]), {0: [], 1: []})[int(r["label"])].append(r)
  out, identical = [], 0
  for group in groups.values():
    for good in group[1]:
      for bad in group[0]:
        if good["response"] == bad["response"]:
          identical += 1
          continue
        out.append({"id": f"{origin}:{good['id']}>{bad['id']}", "prompt": good["prompt"],
                    "responses": [good["response"], bad["response"]], "ranking": [0, 1],
                    "grades": [], "lang": good.get("lang", "")})
  return out, identical


def comparison_table(records: Sequence[dict], offset: int) -> tuple[list[tuple], int]:
  """(rows of (offset + record, better, worse), pairs dropped between identical answers)."""
  rows, identical = [], 0
  for i, record in enumerate(records):
    for w, l in comparison_pairs(record):
      if record["responses"][w] == record["responses"][l]:
        identical += 1
        continue
      rows.append((offset + i, w, l))
  return rows, identical


class PreferenceData:
  """The elements of one split of `names` for an objective: `source` (records), `table`
  (int32 [M, 3] of record, better, worse; better = worse = -1 for a thumb), and counts."""

  def __init__(self, kind: str, names: str | Sequence[str], split: str, data_dir: str | None,
               *, limit: int = 0):
    if kind not in KINDS:
      raise ValueError(f"unknown preference objective {kind!r}; choose from {KINDS}")
    self.kind, self.names, self.split = kind, parse_names(names), split
    sources, rows = [], []
    self.counts: dict[str, dict[str, int]] = {}
    offset = 0
    for name in self.names:
      family = check_name(kind, name)
      source = load_source(name, split, data_dir)
      if kind == "kto":
        records = read_all(source)
        labels = np.asarray([int(r["label"]) for r in records])
        self.counts[name] = {"liked": int(np.sum(labels == 1)),
                             "disliked": int(np.sum(labels == 0))}
        rows.extend((offset + i, -1, -1) for i in range(len(source)))
      else:
        records = read_all(source)
        identical = 0
        if family == FEEDBACK:
          records, identical = feedback_pairs(records, name)
          source = ListSource(records)
        table, more = comparison_table(records, offset)
        self.counts[name] = {"pairs": len(table), "identical_pairs": identical + more}
        rows.extend(table)
      sources.append(source)
      offset += len(source)
    if limit > 0:
      rows = rows[:limit]
    self.source = MixedSource(sources)
    self.table = np.asarray(rows, np.int32).reshape(-1, 3)
    if not len(self.table):
      raise ValueError(f"{kind.upper()}: no {'pairs' if kind == 'dpo' else 'examples'} in "
                       f"{'+'.join(self.names)}[{split}] ({self.counts})")
    log.info("%s data %s[%s]: %s", kind, "+".join(self.names), split, self.counts)

  def label_counts(self) -> tuple[int, int]:
    """(likes, dislikes) over every named dataset (KTO)."""
    return (sum(c["liked"] for c in self.counts.values()),
            sum(c["disliked"] for c in self.counts.values()))

  def check_feedback(self) -> None:
    """KTO needs likes and dislikes both: either alone leaves one term of the loss empty and
    the reference point meaningless."""
    liked, disliked = self.label_counts()
    if not liked or not disliked:
      raise NoFeedbackError(
          f"KTO data {'+'.join(self.names)}[{self.split}] has {liked} likes and {disliked} "
          f"dislikes (per dataset: {self.counts}); it needs both. Mix in another feedback "
          "dataset with '+' in data.names.")

  def records(self) -> list[tuple[dict, tuple[int, int] | None]]:
    """Every element as (record, pair or None), in table order (held-out evaluation)."""
    got = self.source.__getitems__(self.table[:, 0].tolist())
    return [(decode_record(r), None if w < 0 else (int(w), int(l)))
            for r, (w, l) in zip(got, self.table[:, 1:].tolist())]


class PreferenceEncoder:
  """Records -> numpy batch elements (see the module doc). Picklable (grain reads in threads).

  `encode_batch` returns rm_inputs.STAT_KEYS counts under 'stats', as rm_inputs.Encoder does,
  so rm_inputs.ComparisonBatches drives it; 'truncated_answers' counts answers whose prompt
  or end was cut to fit.
  """

  def __init__(self, tokenizer, *, kind: str, max_prompt_len: int, max_answer_len: int):
    self.tokenizer, self.kind = tokenizer, kind
    self.k = 1 if kind == "kto" else 2
    self.max_prompt_len, self.max_answer_len = max_prompt_len, max_answer_len

  def empty(self, n: int) -> dict[str, np.ndarray]:
    rows = layout_rows([], [], max_prompt_len=self.max_prompt_len,
                       max_answer_len=self.max_answer_len, pad_id=self.tokenizer.pad_id,
                       n_rows=n * self.k)
    out = {key: value.reshape(n, self.k, *value.shape[1:]) for key, value in rows.items()}
    out.update(valid=np.zeros((n,), np.float32), label=np.zeros((n,), np.float32),
               lang=np.full((n,), -1, np.int32))
    return out

  def answers_of(self, record: dict, pair: tuple[int, int] | None) -> list[str]:
    if self.kind == "kto":
      if "response" not in record:
        raise ValueError(f"KTO needs thumbs on single answers ({record.get('id')!r} has "
                         f"fields {sorted(record)})")
      return [record["response"]]
    if pair is None:
      raise ValueError(f"DPO needs a (better, worse) pair for record {record.get('id')!r}")
    return [record["responses"][pair[0]], record["responses"][pair[1]]]

  def encode_batch(self, records, pairs, n_rows: int) -> dict[str, np.ndarray]:
    """A batch of n_rows elements; elements beyond len(records) are padding (valid 0)."""
    stats = np.zeros(len(rm_inputs.STAT_KEYS), np.int64)
    prompts, answers = [], []
    out = self.empty(n_rows)
    for row, (record, pair) in enumerate(zip(records, pairs)):
      for answer in self.answers_of(record, pair):
        p, a, cut = encode_prompt_answer(self.tokenizer, record["prompt"], answer,
                                         max_prompt_len=self.max_prompt_len,
                                         max_answer_len=self.max_answer_len)
        prompts.append(p)
        answers.append(a)
        stats[rm_inputs.STAT_KEYS.index("truncated_answers")] += int(cut)
      out["valid"][row] = 1.0
      out["label"][row] = float(record.get("label", 1))
      out["lang"][row] = LANGS.index(record["lang"]) if record.get("lang") in LANGS else -1
    stats[rm_inputs.STAT_KEYS.index("elements")] += len(records)
    rows = layout_rows(prompts, answers, max_prompt_len=self.max_prompt_len,
                       max_answer_len=self.max_answer_len, pad_id=self.tokenizer.pad_id,
                       n_rows=n_rows * self.k)
    for key, value in rows.items():
      out[key] = value.reshape(n_rows, self.k, *value.shape[1:])
    out["stats"] = stats
    return out


def make_batches(data: PreferenceData, encoder: PreferenceEncoder, *, batch_size: int,
                 seed: int, process_index: int, process_count: int,
                 num_epochs: int | None) -> rm_inputs.ComparisonBatches:
  """The resumable, shuffled stream of this process's share of each global batch."""
  return rm_inputs.ComparisonBatches(
      data.source, data.table, encoder, batch_size=batch_size, seed=seed,
      process_index=process_index, process_count=process_count, num_epochs=num_epochs)


def auto_undesirable_weight(desirable_weight: float, liked: int, disliked: int,
                            ratio: float = 1.0) -> float:
  """λ_U with λ_D·n_D / (λ_U·n_U) = ratio: likes and dislikes pull with equal total weight at
  ratio 1 (KTO's advice is a ratio in [1, 4/3])."""
  return desirable_weight * liked / (disliked * ratio)


ROW_KEYS = ("tokens", "positions", "segment_ids", "answer_mask")  # one row per answer


def flat_rows(batch) -> dict:
  """{tokens, positions, segment_ids: [B*K, S], answer_mask: [B*K, N]} of a [B, K, ...] batch."""
  return {k: batch[k].reshape(-1, *batch[k].shape[2:]) for k in ROW_KEYS}
