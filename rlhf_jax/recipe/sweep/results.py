"""A sweep's results: each run's metrics read from its own files, one table row per run
(W/results.md, .csv, .json) and one plot (W/plot.png)."""
from __future__ import annotations

import csv
import difflib
import fnmatch
import json
import logging
import os
from typing import Any, Mapping

from rlhf_jax.core import metrics
from rlhf_jax.recipe.sweep.spec import Sweep, format_value, source_path
from rlhf_jax.recipe.sweep.status import run_dir, run_status

log = logging.getLogger("rlhf_jax.recipe.sweep")


# ----------------------------------------------------------------------------- metrics

def _flatten(value, prefix: str = "") -> dict:
  """{"a.b.0": leaf}: nested dicts and lists under the dotted path of keys and indices."""
  if isinstance(value, Mapping):
    items = value.items()
  elif isinstance(value, list):
    items = enumerate(value)
  else:
    return {prefix[:-1]: value}
  out = {}
  for k, v in items:
    out.update(_flatten(v, f"{prefix}{k}."))
  return out


def read_source(path: str, source: str) -> dict | None:
  """{key: value} of one source of the run in `path` (see the package doc), or None when it has
  no file. A .jsonl file gives each metric's last logged value. A file that is not JSON (or
  not objects) is a FileContentError naming it (and the line)."""
  path = os.path.join(path, source_path(source))
  if not os.path.exists(path):
    return None
  if path.endswith(".jsonl"):
    last = {}
    for record in metrics.read_json_lines(path):
      last.update(record)
    return last
  return _flatten(metrics.read_json(path))


def as_number(value):
  """A metric as a number, or None; bools count as 0 / 1."""
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, (int, float)):
    return value
  try:  # metrics.jsonl writes non-finite floats as strings ("nan", "inf")
    return float(value)
  except (TypeError, ValueError):
    return None


def resolve_metric(path: str, spec: str, cache: dict | None = None):
  """The value of one metric spec for the run in `path`, or None (with a warning) when it is
  not there. `cache` keeps each source's file read once per run."""
  cache = {} if cache is None else cache
  source, _, key = spec.partition(":")
  if source not in cache:
    cache[source] = read_source(path, source)
  values = cache[source]
  if values is None:
    log.warning("%s: no %s for metric %r", path, source_path(source), spec)
    return None
  if "*" in key or "?" in key:
    matches = [as_number(values[k]) for k in fnmatch.filter(list(values), key)]
    matches = [m for m in matches if m is not None]
    if matches:
      return float(sum(matches) / len(matches))
  elif key in values:
    return values[key]
  close = difflib.get_close_matches(key, [str(k) for k in values], n=3)
  log.warning("%s: metric %r not found in %s%s", path, spec, source_path(source),
              f"; close: {close}" if close else "")
  return None


def collect(sweep: Sweep, workdir: str) -> list[dict]:
  """One row per run of the sweep: run, status, overrides, metrics (None where missing), and
  the error of a failed or stopped run."""
  rows = []
  for run in sweep.runs:
    path = run_dir(workdir, run.name)
    status, message = run_status(path)
    row = {"run": run.name, "status": status}
    row.update({k: run.overrides.get(k) for k in sweep.override_keys})
    cache: dict = {}
    for label, spec in sweep.metrics.items():
      row[label] = resolve_metric(path, spec, cache) if status == "done" else None
    row["error"] = message
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------- tables

def _columns(rows: list[dict]) -> list[str]:
  return list(rows[0]) if rows else ["run", "status"]


def write_csv(rows: list[dict], path: str) -> None:
  columns = _columns(rows)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:  # repr keeps floats exact, so the CSV round-trips
      writer.writerow(["" if row[c] is None else repr(row[c]) if isinstance(row[c], float)
                       else row[c] for c in columns])


def write_json(sweep: Sweep, rows: list[dict], sets: Mapping[str, Any], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"sweep": sweep.path, "base": sweep.base, "start": sweep.start,
               "set": dict(sets), "metrics": sweep.metrics,
               "plot": list(sweep.plot) if sweep.plot else None, "runs": rows},
              f, indent=1, default=str)


def _md_cell(value) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(sweep: Sweep, rows: list[dict], sets: Mapping[str, Any], plotted: bool) -> str:
  """results.md: what was swept, how many runs finished, the table, and the plot if drawn."""
  columns = _columns(rows)
  finished = sum(r["status"] == "done" for r in rows)
  lines = [f"# Sweep `{sweep.path}`", "",
           f"Base config `{sweep.base}`" + (f" with {dict(sets)}" if sets else "")
           + f"; each run redoes the stages from `{sweep.start}` on. "
           f"{finished} of {len(rows)} runs finished.", "",
           "Metrics: " + "; ".join(f"`{label}` = `{spec}`" if label != spec else f"`{spec}`"
                                   for label, spec in sweep.metrics.items()), "",
           "| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_md_cell(row[c]) for c in columns) + " |" for row in rows]
  if plotted:
    lines += ["", f"![{sweep.plot[1]} against {sweep.plot[0]}](plot.png)"]
  return "\n".join(lines) + "\n"


def write_results(sweep: Sweep, rows: list[dict], workdir: str,
                  sets: Mapping[str, Any] | None = None) -> None:
  """W/results.md, .csv, .json and W/plot.png."""
  sets = dict(sets or {})
  os.makedirs(workdir, exist_ok=True)
  write_csv(rows, os.path.join(workdir, "results.csv"))
  write_json(sweep, rows, sets, os.path.join(workdir, "results.json"))
  plotted = plot(sweep, rows, os.path.join(workdir, "plot.png")) if sweep.plot else False
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown(sweep, rows, sets, plotted))
  print(f"[sweep] results: {os.path.join(workdir, 'results.md')}")


# ----------------------------------------------------------------------------- the plot

def _plot_points(sweep: Sweep, rows: list[dict]):
  """(xs, ys, names, categories): numbers to draw, with the x categories in order of first
  appearance when x is not numeric (e.g. the RM loss name), else None."""
  x_key, y_key = sweep.plot
  points = [(row[x_key], row[y_key], row["run"]) for row in rows
            if row[x_key] is not None and as_number(row[y_key]) is not None]
  if all(not isinstance(x, bool) and as_number(x) is not None for x, _, _ in points):
    categories = None
    xs = [float(as_number(x)) for x, _, _ in points]
  else:
    categories = list(dict.fromkeys(format_value(x) for x, _, _ in points))
    xs = [categories.index(format_value(x)) for x, _, _ in points]
  return xs, [float(as_number(y)) for _, y, _ in points], [n for _, _, n in points], categories


def plot(sweep: Sweep, rows: list[dict], path: str) -> bool:
  """y against x, one labelled point per finished run; False when no run has both values."""
  x_key, y_key = sweep.plot
  xs, ys, names, categories = _plot_points(sweep, rows)
  if not xs:
    log.warning("no finished run has both %r and %r: no plot", x_key, y_key)
    return False
  import matplotlib  # optional, and slow to import: only when a plot is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
  ax.scatter(xs, ys, zorder=3)
  for x, y, name in zip(xs, ys, names):
    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  if categories is None:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
  else:
    ax.set_xticks(range(len(categories)), categories)
  ax.margins(x=0.2, y=0.15)  # room for the run names
  ax.set_xlabel(x_key + (f"  ({sweep.metrics[x_key]})" if x_key in sweep.metrics else ""))
  ax.set_ylabel(f"{y_key}  ({sweep.metrics[y_key]})")
  ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(sweep.path))) or sweep.path)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True
