r"""Held-out evaluation of a reward model: pairwise accuracy, margin, calibration, per language.

Two references for every held-out comparison:
  labels  the annotators' ranking / grades (noisy: people agree ~73% of the time), and
  gold    the gold scorer's noiseless ordering of the same answers (ties give no pair): what
          the annotators were trying to express, so an RM can beat the labels' own accuracy.
Calibration: for every labelled pair, in both orders, the RM's P(a beats b) = sigma(r_a - r_b)
against what was observed, in equal-width bins of predicted probability; `ece` is the
bin-weighted mean |predicted - observed| (0 = perfectly calibrated).
Best-of-n (per language): the held-out answers are the SFT policy's samples, so reranking them
with the RM measures, on gold, what the RM's signal buys against SFT without training
(`best_of_n_win`), a number of the kind PPO's gold win rate is.

  python -m rlhf_jax.eval.reward_model --workdir=W/rm [--data=rlhf_comparisons/round0 --split=test]

prints one JSON object and a Markdown table. `comparison_metrics` is the numpy core the RM
trainer's periodic evaluation shares.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

import numpy as np

from rlhf_jax.core.langs import LANGS
from rlhf_jax.data import labelers
from rlhf_jax.infer.rm_scores import comparison_scores
from rlhf_jax.data.rm_batches import MODEL_KEYS, STAT_KEYS, Encoder
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.core import run_folder
from rlhf_jax.infer.rm_scores import load_reward_model
from rlhf_jax.data.rm_batches import read_records



def _sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def _pair_mask(prefer: np.ndarray, valid: np.ndarray) -> np.ndarray:
  k = prefer.shape[-1]
  mask = (prefer > 0) & (valid[:, :, None] > 0) & (valid[:, None, :] > 0)
  return mask & ~np.eye(k, dtype=bool)[None]


def _accuracy_stats(diff: np.ndarray, mask: np.ndarray) -> tuple[float, float, int]:
  """(accuracy, mean margin, pairs) of diff [N, K, K] = r_i - r_j on the pairs of mask."""
  n = int(mask.sum())
  if n == 0:
    return float("nan"), float("nan"), 0
  d = diff[mask]
  return _right_share(d), float(np.mean(d)), n


def _right_share(d: np.ndarray) -> float:
  """Share of pairs whose score difference d = r_winner - r_loser is right, a tie half."""
  return float(np.mean((d > 0) + 0.5 * (d == 0)))


def calibration_table(diff: np.ndarray, mask: np.ndarray, bins: int = 10) -> list[dict]:
  """Bins of predicted P(i beats j) = sigma(diff) over the labelled pairs taken both ways."""
  p = _sigmoid(diff[mask])
  predicted = np.concatenate([p, 1.0 - p])
  observed = np.concatenate([np.ones_like(p), np.zeros_like(p)])
  edges = np.linspace(0.0, 1.0, bins + 1)
  which = np.clip(np.digitize(predicted, edges[1:-1]), 0, bins - 1)
  table = []
  for b in range(bins):
    sel = which == b
    if sel.any():
      table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()),
                    "predicted": float(predicted[sel].mean()),
                    "observed": float(observed[sel].mean())})
  return table


def expected_calibration_error(table: list[dict]) -> float:
  total = sum(row["n"] for row in table)
  if not total:
    return float("nan")
  return sum(row["n"] * abs(row["predicted"] - row["observed"]) for row in table) / total


GAP_BINS = 3  # gold pairs per language split into thirds by how far apart gold puts them


def gold_gap_bins(diff: np.ndarray, gold: np.ndarray, gold_mask: np.ndarray,
                  prefer: np.ndarray, bins: int = GAP_BINS) -> list[dict]:
  """The gold pairs of gold_mask [N, K, K] split into `bins` equal-count groups by their gold
  gap g_i - g_j (> 0; closest first): per group the RM's gold accuracy and the annotators'
  agreement with gold (their pair preferred the gold winner; neither way counts half).

  Why: gold accuracy mixes pairs gold barely separates, where the annotators themselves are
  near a coin, with clear ones; an RM short of a goal overall may still rank clear pairs well.
  Gaps are in the gold scorer's units, so one language at a time.
  """
  gap = (gold[:, :, None] - gold[:, None, :])[gold_mask]  # [P]
  d = diff[gold_mask]
  agree = prefer[gold_mask] > 0
  disagree = np.swapaxes(prefer, 1, 2)[gold_mask] > 0
  labels = agree + 0.5 * (~agree & ~disagree)
  out = []
  for part in np.array_split(np.argsort(gap, kind="stable"), bins):
    if len(part):
      out.append({"n": len(part), "gap_hi": float(gap[part].max()),
                  "accuracy": _right_share(d[part]), "labels": float(np.mean(labels[part]))})
  return out


def best_of_n_sizes(k: int) -> list[int]:
  """The n at which best-of-n is reported with K answers a prompt: powers of two below K - 1,
  then K - 1 (one answer must stay out of the subset to be the comparator)."""
  sizes = [n for n in (2, 4, 8, 16, 32) if n < k - 1]
  return sizes + [k - 1] if k > 2 else []


def best_of_n_kl(n: int) -> float:
  """KL(best-of-n || the sampler) in nats, log n - (n - 1) / n: the closed form for picking
  the top of n independent samples by a score without ties."""
  return float(np.log(n) - (n - 1) / n)


def best_of_n_win(scores, gold, valid, n: int) -> np.ndarray:
  """[N] per prompt: how often the RM's pick of n answers beats one more answer on gold.

  Over every uniformly random n-subset of a prompt's answers (valid, gold known) and one
  comparator drawn from the answers left out, the answer the RM scores highest in the subset
  against the comparator on the gold score (a tie counts half), averaged exactly: the answer
  ranked r-th by the RM (0 the best, ties in RM score broken by position) is the pick with
  C(below, n-1) subsets, below the number of answers the RM ranks under it (less one if the
  comparator is among them), of C(k, n) * (k - n) draws. NaN where a prompt has fewer than
  n + 1 such answers.

  Why: the held-out comparisons' answers are samples of the SFT policy, so this is what
  reranking SFT's own samples with the RM wins against SFT on gold, without training, at a KL
  of best_of_n_kl(n) from SFT: the RM's signal as PPO's gold win rate against SFT measures it.
  n = 1 gives 0.5 whatever the scores.
  """
  scores, gold = np.asarray(scores, np.float64), np.asarray(gold, np.float64)
  usable = np.asarray(valid) > 0
  usable &= np.isfinite(gold)
  out = np.full(len(scores), np.nan)
  for row in range(len(scores)):
    idx = np.flatnonzero(usable[row])
    k = len(idx)
    if k < n + 1:
      continue
    order = idx[np.argsort(-scores[row, idx], kind="stable")]  # the RM's ranking
    g = gold[row, order]  # [k], the RM's best first
    wins = (g[:, None] > g[None, :]) + 0.5 * (g[:, None] == g[None, :])  # [pick, comparator]
    below = k - 1 - np.arange(k)  # answers the RM ranks under each
    comparator_below = np.arange(k)[None, :] > np.arange(k)[:, None]
    ways = np.vectorize(math.comb)(below[:, None] - comparator_below, n - 1).astype(np.float64)
    np.fill_diagonal(ways, 0.0)
    out[row] = float((ways * wins).sum() / (math.comb(k, n) * (k - n)))
  return out


def best_of_n_found(keys, lang: str, prefix: str = "") -> list[int]:
  """The n of every `{prefix}gold_bon{n}_win/{lang}` among `keys`, ascending."""
  head, tail = f"{prefix}gold_bon", f"_win/{lang}"
  return sorted({int(k[len(head):-len(tail)]) for k in keys
                 if k.startswith(head) and k.endswith(tail)})


def _gold_breakdown(scores, diff, gold, valid, prefer, gold_mask,
                    suffix: str) -> dict[str, float]:
  """One language's gold accuracy in thirds by gold gap and its best-of-n gold win rates."""
  out = {}
  for b, row in enumerate(gold_gap_bins(diff, gold, gold_mask, prefer), 1):
    out.update({f"gold_gap{b}_accuracy{suffix}": row["accuracy"],
                f"gold_gap{b}_labels{suffix}": row["labels"],
                f"gold_gap{b}_hi{suffix}": row["gap_hi"]})
  for n in best_of_n_sizes(scores.shape[1]):
    wins = best_of_n_win(scores, gold, valid, n)
    if np.isfinite(wins).any():
      out[f"gold_bon{n}_win{suffix}"] = float(np.nanmean(wins))
  return out


def comparison_metrics(scores, valid, prefer, lang, gold=None, label=None, labeled=None,
                       bins: int = 10) -> tuple[dict[str, float], list[dict]]:
  """Metrics of raw RM scores [N, K] on held-out comparisons, and the calibration table.

  valid [N, K]; prefer [N, K, K] (the labels' pairs); lang [N] (index in LANGS, -1 other);
  gold [N, K] gold scores (NaN where unknown), or None; label / labeled [N, K] thumbs, or None.
  Keys: loss, accuracy, margin, pairs, ece, gold_accuracy, gold_pairs, thumbs_accuracy, each
  also per language as '<key>/<lang>' where that language has pairs; per language only,
  gold_gap{b}_{accuracy,labels,hi}/<lang> for the thirds of its gold pairs (`gold_gap_bins`,
  b = 1 the closest) and gold_bon{n}_win/<lang>, the gold win of the RM's best of n answers
  against another (`best_of_n_win`, n in `best_of_n_sizes(K)`).
  """
  scores = np.asarray(scores, np.float64)
  valid, prefer = np.asarray(valid), np.asarray(prefer)
  lang = np.asarray(lang)
  diff = scores[:, :, None] - scores[:, None, :]  # [N, K, K]
  mask = _pair_mask(prefer, valid)
  gold_mask = None
  if gold is not None:
    g = np.asarray(gold, np.float64)
    known = np.isfinite(g) & (valid > 0)
    with np.errstate(invalid="ignore"):
      gold_mask = (g[:, :, None] > g[:, None, :]) & known[:, :, None] & known[:, None, :]
  out: dict[str, float] = {}
  groups = [("", np.ones(len(lang), bool))] + [(f"/{name}", lang == i)
                                               for i, name in enumerate(LANGS)]
  for suffix, rows in groups:
    if not rows.any():
      continue
    m = mask & rows[:, None, None]
    acc, margin, n = _accuracy_stats(diff, m)
    if n:
      per_pair = np.logaddexp(0.0, -diff)  # -log sigma(r_i - r_j)
      n_prompt = m.sum(axis=(1, 2))
      has = n_prompt > 0
      loss = (per_pair * m).sum(axis=(1, 2))[has] / n_prompt[has]
      out.update({f"loss{suffix}": float(loss.mean()), f"accuracy{suffix}": acc,
                  f"margin{suffix}": margin, f"pairs{suffix}": float(n)})
      out[f"ece{suffix}"] = expected_calibration_error(calibration_table(diff, m, bins))
    if gold_mask is not None:
      gacc, _, gn = _accuracy_stats(diff, gold_mask & rows[:, None, None])
      if gn:
        out.update({f"gold_accuracy{suffix}": gacc, f"gold_pairs{suffix}": float(gn)})
      if gn and suffix:
        out.update(_gold_breakdown(scores[rows], diff[rows], g[rows], valid[rows],
                                   prefer[rows], gold_mask[rows], suffix))
    if labeled is not None:
      lab = (np.asarray(labeled) > 0) & rows[:, None]
      if lab.any():
        sign = np.where(np.asarray(label)[lab] > 0, 1.0, -1.0)
        s = scores[lab] * sign
        out[f"thumbs_accuracy{suffix}"] = float(np.mean((s > 0) + 0.5 * (s == 0)))
        out[f"thumbs{suffix}"] = float(lab.sum())
  table = calibration_table(diff, mask, bins) if mask.any() else []
  return out, table


def gold_scores(records: Sequence[dict], max_answers: int, scorer: str = "gold") -> np.ndarray:
  """[N, max_answers] gold scores of each record's answers (NaN where no answer or language)."""
  score = labelers.get_scorer(scorer)
  out = np.full((len(records), max_answers), np.nan)
  by_lang: dict[str, list[tuple[int, int, str]]] = {}
  for n, record in enumerate(records):
    responses = record.get("responses") or [record.get("response", "")]
    for k, text in enumerate(responses[:max_answers]):
      by_lang.setdefault(record.get("lang", ""), []).append((n, k, text))
  for lang, items in by_lang.items():
    if lang not in LANGS:
      continue
    values = score([t for _, _, t in items], lang)
    for (n, k, _), v in zip(items, values):
      out[n, k] = v
  return out


def score_records(params, model_config, tokenizer, records: Sequence[dict], *, seq_len: int,
                  max_answers: int, batch_size: int = 16, layout: str = "answers",
                  row_len: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """(the encoded comparisons with the RM's raw `scores` [N, K], the encoder's STAT_KEYS
  counts): every answer of `records` scored on one device, as the RM's data encodes them.

  layout / row_len: the RM data's (data/rm_batches.py), so a run is read as it was trained
  and evaluated: in 'shared_prompt' a comparison's prompt is written once, where 'answers'
  cuts every prompt + answer to seq_len on its own.
  """
  import jax

  encoder = Encoder(tokenizer, seq_len=seq_len, max_answers=max_answers, layout=layout,
                    row_len=row_len)
  model = ScalarModel(model_config)
  fn = jax.jit(lambda params, batch: comparison_scores(params, batch, model))
  parts = []
  stats = np.zeros(len(STAT_KEYS), np.int64)
  for start in range(0, len(records), batch_size):
    chunk = list(records[start:start + batch_size])
    batch = encoder.encode_batch(chunk, [None] * len(chunk), batch_size)
    stats += batch.pop("stats")
    scores = fn(params, {key: batch[key] for key in MODEL_KEYS[layout]})  # [B, K]
    batch["scores"] = np.asarray(jax.device_get(scores))
    parts.append({key: v[:len(chunk)] for key, v in batch.items()})
  return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, stats


def evaluate_records(params, model_config, tokenizer, records: Sequence[dict], *, seq_len: int,
                     max_answers: int, scorer: str = "gold", batch_size: int = 16,
                     bins: int = 10, layout: str = "answers",
                     row_len: int = 0) -> tuple[dict[str, float], list[dict]]:
  """The RM's metrics on `records` (score_records, then comparison_metrics against the
  `scorer`'s gold ordering; '' for none)."""
  cat, stats = score_records(params, model_config, tokenizer, records, seq_len=seq_len,
                             max_answers=max_answers, batch_size=batch_size, layout=layout,
                             row_len=row_len)
  gold = gold_scores(records, max_answers, scorer) if scorer else None
  metrics, table = comparison_metrics(cat["scores"], cat["valid"], cat["prefer"], cat["lang"],
                                      gold, cat["label"], cat["labeled"], bins)
  metrics.update({f"data/{k}": float(v) for k, v in zip(STAT_KEYS, stats)})
  return metrics, table


def markdown_table(metrics: dict[str, float]) -> str:
  rows = ["| lang | pairs | accuracy (labels) | accuracy (gold) | margin | loss | ECE |",
          "|---|---|---|---|---|---|---|"]
  for suffix, name in [("", "all")] + [(f"/{lang}", lang) for lang in LANGS]:
    if f"pairs{suffix}" not in metrics and f"thumbs{suffix}" not in metrics:
      continue
    def fmt(key, pct=True):
      v = metrics.get(key + suffix)
      return "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")
    rows.append(f"| {name} | {int(metrics.get('pairs' + suffix, 0))} | {fmt('accuracy')} | "
                f"{fmt('gold_accuracy')} | {fmt('margin', False)} | {fmt('loss', False)} | "
                f"{fmt('ece', False)} |")
  gaps = [lang for lang in LANGS if f"gold_gap1_accuracy/{lang}" in metrics]
  if gaps:
    rows += ["", "| lang | gold accuracy / labels' agreement with gold, closest third of the gold "
             "pairs | middle third | clearest third |", "|---|---|---|---|"]
    for lang in gaps:
      rows.append(f"| {lang} | " + " | ".join(
          f"{metrics[f'gold_gap{b}_accuracy/{lang}']:.3f} / "
          f"{metrics[f'gold_gap{b}_labels/{lang}']:.3f} "
          f"(gap <= {metrics[f'gold_gap{b}_hi/{lang}']:.3f})" for b in (1, 2, 3)) + " |")
  bon = {lang: best_of_n_found(metrics, lang) for lang in LANGS}
  for lang, sizes in bon.items():
    if sizes:
      rows += ["", f"| {lang}: the RM's best of n against another answer, gold win | " +
               " | ".join(f"n={n} (KL {best_of_n_kl(n):.2f})" for n in sizes) + " |",
               "|---" * (len(sizes) + 1) + "|",
               "| | " + " | ".join(f"{metrics[f'gold_bon{n}_win/{lang}']:.3f}" for n in sizes)
               + " |"]
  return "\n".join(rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="an RM run's workdir")
  p.add_argument("--data", default="", help="comparisons dataset; default: the run's data.name")
  p.add_argument("--split", default="", help="default: the split the run evaluated on")
  p.add_argument("--data_dir", default="", help="default: the run's data.data_dir")
  p.add_argument("--scorer", default=None,
                 help="gold scorer name, default the run's eval.scorer; '' to skip gold accuracy")
  p.add_argument("--limit", type=int, default=0, help="at most this many comparisons (0: all)")
  p.add_argument("--json_out", default="")
  args = p.parse_args(argv)

  model_config, params, _, _ = load_reward_model(args.workdir, require_normalization=False)
  tokenizer = run_folder.tokenizer(args.workdir)
  saved = run_folder.read_saved_config(args.workdir)
  data, split = saved["data"], args.split or saved["eval"]["split"]
  scorer = saved["eval"]["scorer"] if args.scorer is None else args.scorer
  records = read_records(args.data or data["name"], split,
                         args.data_dir or data["data_dir"] or None, args.limit)
  metrics, table = evaluate_records(params, model_config, tokenizer, records,
                                    seq_len=data["seq_len"], max_answers=data["max_answers"],
                                    scorer=scorer, layout=data.get("layout", "answers"),
                                    row_len=data.get("row_len", 0))
  result = {"workdir": args.workdir, "data": args.data or data["name"], "split": split,
            "comparisons": len(records), "metrics": metrics, "calibration": table}
  print(json.dumps(result, indent=1))
  print()
  print(markdown_table(metrics))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
