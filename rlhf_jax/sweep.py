r"""Ablation sweeps from config files: one shared base pipeline, then one pipeline run per variant.

  python -m rlhf_jax.sweep experiments/kl_sweep/sweep.py --workdir=W [--base=W0] \
      [--runs=NAME,NAME] [--print_commands] [--collect] [--base_config=SPEC] [--set=KEY=VALUE]

A sweep file is a Python module that defines

  get_sweep()  a list of runs, each a dict {dotted pipeline-config key: value}, e.g.
               {"ppo.kl.coef": 0.0, "ppo.kl.adaptive": False}; `product` and `zipped` below
               build such lists ("_name" in a dict names the run instead of its overrides)
  BASE         the config every run starts from, "configs/pipeline.py:size=small"
  START        the first stage each run redoes; the stages before it run once, in W/base (or
               come from --base=W0, a finished pipeline workdir), and every run reads them there
  METRICS      {column label: metric spec}, or a list of specs (each its own label)
  PLOT         (x, y): metric labels to plot across runs; x may also be an override key

Metric specs say where a run's number comes from, relative to the run's workdir W/runs/<name>:

  "SOURCE:KEY"  SOURCE is `summary` (summary.json), `results` (evaluate/results.json), a stage
                name such as `ppo` (<stage>/metrics.jsonl), or any path ending in .json or
                .jsonl. In a .json file KEY is the path of nested keys joined by "." (list
                items by their index); in a .jsonl file of metrics KEY is a metric name and
                the value is the last one logged. A "*" in KEY takes the mean over every
                matching key: "ppo:eval/*/gold" is the gold score averaged over languages.

Runs go one after another in this process. A finished run is skipped, so an interrupted sweep
goes on where it stopped (an unfinished run starts over from START); a run that fails is
recorded as failed (with its error, in the table and in W/runs/<name>/FAILED.txt) and the
others still run. At the end come W/results.md, W/results.csv, W/results.json (one row per
run: status, overrides, metrics) and W/plot.png. `--print_commands` prints the command of
each run instead (for a cluster scheduler) and runs nothing; `--collect` only tabulates what
is on disk.

Overrides are checked against the base config before anything runs: an unknown key is an error
naming the closest known ones, and a key of a stage before START (which the runs share, so
changing it per run would silently do nothing) is an error too.
"""
from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import difflib
import fnmatch
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import shlex
import sys
import time
import traceback
from typing import Any, Iterable, Mapping, Sequence

log = logging.getLogger("rlhf_jax.sweep")

RUN_FILE = "sweep_run.json"  # in each run's workdir: the settings it was run with
FAILED_FILE = "FAILED.txt"  # in each run's workdir: the traceback of its last failure
SOURCE_FILES = {"summary": "summary.json", "results": os.path.join("evaluate", "results.json")}
_NAME_KEY = "_name"
_MAX_NAME = 96


# ----------------------------------------------------------------------------- building sweeps

def _axes(axes: Mapping[str, Sequence] | None, kwargs: Mapping[str, Sequence]) -> dict:
  """Axes given as a dict of dotted keys and/or as keyword arguments (`ppo__kl__coef=` for
  "ppo.kl.coef", since a keyword cannot hold a dot)."""
  out = dict(axes or {})
  for key, values in kwargs.items():
    out[key.replace("__", ".")] = values
  for key, values in out.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
      raise TypeError(f"axis {key!r} must be a list of values, got {values!r}")
  return {k: list(v) for k, v in out.items()}


def product(axes: Mapping[str, Sequence] | None = None, **kwargs: Sequence) -> list[dict]:
  """Every combination of the axes' values, the first axis varying slowest.

  product({"ppo.kl.coef": [0.0, 0.1], "seed": [0, 1]}) gives 4 runs: (0.0, 0), (0.0, 1),
  (0.1, 0), (0.1, 1).
  """
  axes = _axes(axes, kwargs)
  keys = list(axes)
  return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zipped(axes: Mapping[str, Sequence] | None = None, **kwargs: Sequence) -> list[dict]:
  """The i-th run takes the i-th value of every axis; the axes must be equally long."""
  axes = _axes(axes, kwargs)
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zipped axes must have equal lengths, got {lengths}")
  keys = list(axes)
  return [dict(zip(keys, values)) for values in zip(*axes.values())]


# ----------------------------------------------------------------------------- run names

def _format_value(value: Any) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "-".join(_format_value(v) for v in value)
  return str(value)


def _safe(text: str) -> str:
  """Only characters that every filesystem and a shell word take as they are."""
  return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-.") or "run"


def short_keys(keys: Iterable[str]) -> dict[str, str]:
  """The shortest dotted suffix of each key that no other key ends with.

  {"ppo.kl.coef", "ppo.ptx.coef", "ppo.kl.adaptive"} -> kl.coef, ptx.coef, adaptive.
  """
  keys = list(dict.fromkeys(keys))
  out = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      suffix = ".".join(parts[-n:])
      if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
        break
    out[key] = suffix
  return out


def run_names(runs: Sequence[Mapping[str, Any]]) -> list[str]:
  """Readable, filesystem-safe, unique names: "coef=0.01+adaptive=false".

  Keys are shortened to the suffix that tells them apart within the sweep; a run with no
  overrides is "default"; a dict's "_name" wins; clashes get "-2", "-3", ... appended.
  """
  short = short_keys(k for run in runs for k in run if k != _NAME_KEY)
  names, seen = [], {}
  for run in runs:
    if _NAME_KEY in run:
      name = _safe(str(run[_NAME_KEY]))
    else:
      name = _safe("+".join(f"{short[k]}={_format_value(v)}" for k, v in run.items())
                   or "default")
    if len(name) > _MAX_NAME:  # keep paths short; the hash keeps them unique
      digest = hashlib.sha1(name.encode()).hexdigest()[:8]
      name = name[:_MAX_NAME - 9] + "-" + digest
    base, n = name, 1
    while name in seen:
      n += 1
      name = f"{base}-{n}"
    seen[name] = True
    names.append(name)
  return names


# ----------------------------------------------------------------------------- overrides

def _leaf_keys(config, prefix: str = "") -> list[str]:
  import ml_collections
  out = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += _leaf_keys(value, prefix + key + ".")
    else:
      out.append(prefix + key)
  return out


def _unknown_key_error(config, key: str, where: str) -> ValueError:
  leaves = _leaf_keys(config)
  close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
  hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
  return ValueError(f"{where}unknown config key {key!r}{hint}")


def apply_overrides(config, overrides: Mapping[str, Any], where: str = ""):
  """A copy of the (locked) config with each dotted key set; the original is left as it is.

  A key that names no field, or a whole section, is an error naming the closest known keys;
  a value of the wrong type is an error naming the key. `where` prefixes the messages.
  """
  import ml_collections
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    if key == _NAME_KEY:
      continue
    *path, field = key.split(".")
    node = config
    for part in path:
      child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(child, ml_collections.ConfigDict):
        raise _unknown_key_error(config, key, where)
      node = child
    if field not in node.keys():
      raise _unknown_key_error(config, key, where)
    if isinstance(node[field], ml_collections.ConfigDict):
      raise ValueError(f"{where}{key!r} is a config section, not a field; set one of "
                       f"{sorted(key + '.' + k for k in node[field].keys())}")
    try:
      setattr(node, field, value)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{where}cannot set {key}={value!r}: {e}") from None
  return config


def parse_set(item: str, config) -> tuple[str, Any]:
  """Parses "ppo.train.steps=2" into ("ppo.train.steps", 2), typed after the field it sets."""
  from rlhf_jax import config_util
  if "=" not in item:
    raise ValueError(f"--set {item!r} is not of the form key=value")
  key, text = (s.strip() for s in item.split("=", 1))
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      raise _unknown_key_error(config, key, "--set: ")
    node = node[part]
  if isinstance(node, (bool, int, float, str)):
    try:
      return key, config_util._coerce(text, node)  # pylint: disable=protected-access
    except ValueError as e:
      raise ValueError(f"--set {key}={text!r}: {e}") from None
  try:
    return key, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return key, text


# ----------------------------------------------------------------------------- sweep files

@dataclasses.dataclass
class Run:
  name: str
  overrides: dict  # dotted key -> value, "_name" removed


@dataclasses.dataclass
class Sweep:
  path: str
  base: str  # config spec, "configs/pipeline.py:size=small"
  start: str  # first stage each run redoes
  runs: list[Run]
  metrics: dict[str, str]  # column label -> metric spec
  plot: tuple[str, str] | None
  base_given: bool = False  # BASE replaced by --base_config

  @property
  def override_keys(self) -> list[str]:
    return list(dict.fromkeys(k for run in self.runs for k in run.overrides))


def _stages() -> tuple[str, ...]:
  from rlhf_jax.pipeline import STAGES
  return tuple(STAGES)


def check_metric_spec(spec: str, where: str = "") -> None:
  source, sep, key = spec.partition(":")
  stages = _stages()
  if not sep or not key:
    raise ValueError(f"{where}metric {spec!r} is not of the form SOURCE:KEY (e.g. "
                     "'ppo:objective/kl', 'results:metrics.ppo.en.gold')")
  if source not in SOURCE_FILES and source not in stages and not source.endswith((".json",
                                                                                  ".jsonl")):
    close = difflib.get_close_matches(source, list(SOURCE_FILES) + list(stages), n=2)
    raise ValueError(f"{where}metric {spec!r}: unknown source {source!r}"
                     + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
                     + f" (known: {sorted(SOURCE_FILES)}, a stage of {list(stages)}, or a path "
                     "ending in .json / .jsonl)")


def load_sweep(path: str) -> Sweep:
  """Reads and checks a sweep file (not its overrides: those need the config, see `prepare`)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no sweep file {path}")
  spec = importlib.util.spec_from_file_location(
      "_sweep_" + re.sub(r"\W", "_", os.path.abspath(path)), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  where = f"{path}: "
  for attr in ("get_sweep", "BASE", "START", "METRICS"):
    if not hasattr(module, attr):
      raise ValueError(f"{where}a sweep file must define {attr} (see rlhf_jax/sweep.py)")
  stages = _stages()
  if module.START not in stages:
    raise ValueError(f"{where}START={module.START!r} is not a stage; stages: {list(stages)}")

  raw = module.get_sweep()
  if not isinstance(raw, (list, tuple)) or not raw:
    raise ValueError(f"{where}get_sweep() must return a non-empty list of dicts, got {raw!r}")
  for i, run in enumerate(raw):
    if not isinstance(run, Mapping):
      raise ValueError(f"{where}run {i} of get_sweep() is not a dict: {run!r}")
  names = run_names(raw)
  runs = [Run(n, {k: v for k, v in r.items() if k != _NAME_KEY}) for n, r in zip(names, raw)]

  metrics = module.METRICS
  if isinstance(metrics, str):
    raise ValueError(f"{where}METRICS must be a list of specs or a dict label -> spec")
  if not isinstance(metrics, Mapping):
    metrics = {m: m for m in metrics}
  metrics = dict(metrics)
  for spec in metrics.values():
    check_metric_spec(spec, where)
  keys = {k for run in runs for k in run.overrides}
  clash = sorted(set(metrics) & (keys | {"run", "status", "error"}))
  if clash:
    raise ValueError(f"{where}METRICS labels {clash} clash with the table's other columns "
                     "(run, status, error and the override keys): rename them")

  plot = getattr(module, "PLOT", None)
  if plot is not None:
    if len(plot) != 2:
      raise ValueError(f"{where}PLOT must be (x, y), got {plot!r}")
    plot = tuple(plot)
    if plot[0] not in metrics and plot[0] not in keys:
      raise ValueError(f"{where}PLOT x {plot[0]!r} is neither a METRICS label {list(metrics)} "
                       f"nor an override key {sorted(keys)}")
    if plot[1] not in metrics:
      raise ValueError(f"{where}PLOT y {plot[1]!r} is not a METRICS label {list(metrics)}")
  return Sweep(path=path, base=module.BASE, start=module.START, runs=runs, metrics=metrics,
               plot=plot)


def check_overrides(sweep: Sweep, config) -> None:
  """Every run's overrides name real fields of a stage the run redoes; raises before any run."""
  stages = _stages()
  shared = set(stages[:stages.index(sweep.start)])
  for i, run in enumerate(sweep.runs):
    where = f"{sweep.path}, run {i} ({run.name}): "
    apply_overrides(config, run.overrides, where)
    for key in run.overrides:
      section = key.split(".", 1)[0]
      if section in shared:
        raise ValueError(
            f"{where}{key!r} changes stage {section!r}, which runs before START={sweep.start!r} "
            f"and is shared by every run; set START={section!r} to redo it per run")


# ----------------------------------------------------------------------------- metrics

def _flatten(value, prefix: str = "") -> dict:
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  if isinstance(value, list):
    out = {}
    for i, v in enumerate(value):
      out.update(_flatten(v, f"{prefix}{i}."))
    return out
  return {prefix[:-1]: value}


def _source_path(source: str) -> str:
  if source in SOURCE_FILES:
    return SOURCE_FILES[source]
  if source.endswith((".json", ".jsonl")):
    return source
  return os.path.join(source, "metrics.jsonl")


def read_source(run_dir: str, source: str) -> dict | None:
  """{key: value} of one source of a run (see the module doc), or None when it has no file."""
  path = os.path.join(run_dir, _source_path(source))
  if not os.path.exists(path):
    return None
  with open(path) as f:
    if path.endswith(".jsonl"):
      last = {}
      for line in f:
        if line.strip():
          last.update(json.loads(line))
      return last
    return _flatten(json.load(f))


def _number(value):
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, (int, float)):
    return value
  try:  # metrics.jsonl writes non-finite floats as strings ("nan", "inf")
    return float(value)
  except (TypeError, ValueError):
    return None


def resolve_metric(run_dir: str, spec: str, cache: dict | None = None):
  """The value of one metric spec for a run, or None (with a warning) when it is not there."""
  cache = {} if cache is None else cache
  source, _, key = spec.partition(":")
  if source not in cache:
    cache[source] = read_source(run_dir, source)
  values = cache[source]
  if values is None:
    log.warning("%s: no %s for metric %r", run_dir, _source_path(source), spec)
    return None
  if "*" in key or "?" in key:
    matches = [_number(values[k]) for k in fnmatch.filter(list(values), key)]
    matches = [m for m in matches if m is not None]
    if matches:
      return float(sum(matches) / len(matches))
  elif key in values:
    return values[key]
  close = difflib.get_close_matches(key, [str(k) for k in values], n=3)
  log.warning("%s: metric %r not found in %s%s", run_dir, spec, _source_path(source),
              f"; close: {close}" if close else "")
  return None


# ----------------------------------------------------------------------------- running

def run_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "runs", name)


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def run_status(path: str) -> tuple[str, str]:
  """(status, message) of a run's workdir.

  done     summary.json lists the last stage (the report) and no stopped one: the pipeline
           writes it also before the report and when a trainer stopped part-way, so its
           presence alone proves nothing
  failed   the last attempt raised (FAILED.txt; the message is the exception's line)
  stopped  a trainer stopped part-way (preempted, train.stop_after): run the sweep again
  pending  not run yet
  """
  summary = _read_json(os.path.join(path, "summary.json"))
  stages = (summary or {}).get("stages", {})
  stopped = [s for s, v in stages.items()
             if isinstance(v, Mapping) and v.get("status") == "stopped"]
  if summary is not None and not stopped and _stages()[-1] in stages:
    return "done", ""
  failed = os.path.join(path, FAILED_FILE)
  if os.path.exists(failed):
    with open(failed, encoding="utf-8") as f:
      lines = [line.strip() for line in f if line.strip()]
    return "failed", (lines[-1][:300] if lines else "failed")
  if stopped:
    return "stopped", str(stages[stopped[0]].get("message", ""))[:300]
  return "pending", ""


def _run_settings(sweep: Sweep, run: Run, sets: Mapping[str, Any]) -> dict:
  return json.loads(json.dumps({"base": sweep.base, "start": sweep.start, "set": dict(sets),
                                "overrides": run.overrides}, default=str))


def _check_same_settings(path: str, settings: dict) -> None:
  """A run directory made with other settings is never silently reused as this run."""
  old = _read_json(os.path.join(path, RUN_FILE))
  if old is not None and old != settings:
    raise ValueError(f"{path} was run with other settings ({old}), not {settings}; remove it or "
                     "choose another --workdir")


def base_stages(start: str) -> list[str]:
  """The stages the runs share: every one before START."""
  stages = _stages()
  return list(stages[:stages.index(start)])


def _unfinished(base_dir: str, stages: Sequence[str]) -> list[str]:
  return [s for s in stages if not os.path.exists(os.path.join(base_dir, s, "DONE.json"))]


def _stale(config, base_dir: str, stages: Sequence[str]) -> list[str]:
  """Finished stages whose DONE.json records another config than `config` would give them."""
  from rlhf_jax import pipeline
  out = []
  for stage in stages:
    done = _read_json(os.path.join(base_dir, stage, "DONE.json")) or {}
    if done.get("config_hash") not in (None, pipeline.config_hash(config, stage)):
      out.append(stage)
  return out


def prepare_base(sweep: Sweep, config, workdir: str, base: str | None) -> str | None:
  """The pipeline workdir the runs read their shared stages from, finished; None when START
  is the first stage (nothing shared).

  --base=W0 must have finished them already (a config differing from the sweep's is only
  warned about: W0 is the user's choice). Otherwise they run in W/base: the first unfinished
  one and every later one (a stage depends on all before it); a W/base made from another
  config is an error rather than silently reused.
  """
  stages = base_stages(sweep.start)
  if not stages:
    return None
  if base:
    missing = _unfinished(base, stages)
    if missing:
      raise ValueError(f"--base={base} has not finished the stages {missing} that the runs "
                       "read (no DONE.json): run the pipeline there first")
    stale = _stale(config, base, stages)
    if stale:
      log.warning("--base=%s: stages %s were run with another config than the sweep's base",
                  base, stale)
    return base
  from rlhf_jax import pipeline
  base = os.path.join(workdir, "base")
  stale = _stale(config, base, stages)
  if stale:
    raise ValueError(f"{base}: stages {stale} were run with another config than this sweep's "
                     f"base ({sweep.base}); remove {base} or choose another --workdir")
  missing = _unfinished(base, stages)
  if missing:
    redo = stages[stages.index(missing[0]):]
    print(f"[sweep] shared stages {redo} in {base}")
    pipeline.run_pipeline(config, base, only=redo)
    missing = _unfinished(base, stages)
    if missing:
      raise RuntimeError(f"the shared stages {missing} did not finish in {base} (stopped "
                         "part-way?): run the sweep again to go on")
  else:
    print(f"[sweep] shared stages {stages}: finished earlier in {base}")
  return base


def _run_one(config, path: str, start: str, upstream: str | None) -> None:
  from rlhf_jax import pipeline
  if upstream is None:  # START is the first stage: nothing is shared
    pipeline.run_pipeline(config, path)
  else:  # redoes START and every later stage: an unfinished run starts over from START
    pipeline.run_pipeline(config, path, start=start, upstream=upstream)


def run_sweep(sweep_path: str, workdir: str, *, base: str | None = None,
              runs: Sequence[str] | None = None, collect_only: bool = False,
              base_config: str | None = None, sets: Sequence[str] = ()) -> list[dict]:
  """Runs (or, with `collect_only`, only tabulates) a sweep; returns the rows of the table.

  `sets` are "key=value" strings set on the base config of every run (the --set flag).
  """
  sweep, config, set_values = prepare(sweep_path, base_config, sets)
  selected = select_runs(sweep, runs)

  if not collect_only:
    upstream = prepare_base(sweep, config, workdir, base)
    for i, run in enumerate(selected):
      path = run_dir(workdir, run.name)
      head = f"[sweep] run {i + 1}/{len(selected)} {run.name}"
      settings = _run_settings(sweep, run, set_values)
      _check_same_settings(path, settings)
      if run_status(path)[0] == "done":
        print(f"{head}: finished earlier, skipped")
        continue
      os.makedirs(path, exist_ok=True)
      for stale in ("summary.json", FAILED_FILE):  # this attempt's outcome replaces them
        if os.path.exists(os.path.join(path, stale)):
          os.remove(os.path.join(path, stale))
      with open(os.path.join(path, RUN_FILE), "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)
      print(f"{head}: {run.overrides}", flush=True)
      t0 = time.time()
      try:
        _run_one(apply_overrides(config, run.overrides), path, sweep.start, upstream)
      except Exception as e:  # pylint: disable=broad-except
        with open(os.path.join(path, FAILED_FILE), "w", encoding="utf-8") as f:
          f.write(traceback.format_exc())
        print(f"{head} FAILED after {time.time() - t0:.0f}s: {_one_line(e)} (traceback in "
              f"{os.path.join(path, FAILED_FILE)})", flush=True)
        continue
      status, message = run_status(path)
      print(f"{head}: {status} in {time.time() - t0:.0f}s" + (f" ({message})" if message else ""),
            flush=True)

  rows = collect(sweep, workdir)
  write_results(sweep, rows, workdir, set_values)
  return rows


def prepare(sweep_path: str, base_config: str | None = None, sets: Sequence[str] = ()):
  """(sweep, its base config with `sets` applied, {key: value} of the sets), every run's
  overrides checked against that config."""
  from rlhf_jax import config_util
  sweep = load_sweep(sweep_path)
  if base_config:
    sweep.base, sweep.base_given = base_config, True
  config = config_util.load_config(sweep.base)
  set_values = dict(parse_set(s, config) for s in sets)
  config = apply_overrides(config, set_values, "--set: ")
  check_overrides(sweep, config)
  return sweep, config, set_values


def _one_line(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}".strip().splitlines()
  return (text[0] if text else type(error).__name__)[:300]


def select_runs(sweep: Sweep, names: Sequence[str] | None) -> list[Run]:
  if not names:
    return list(sweep.runs)
  known = {r.name: r for r in sweep.runs}
  for name in names:
    if name not in known:
      close = difflib.get_close_matches(name, list(known), n=3)
      raise ValueError(f"--runs: no run {name!r} in {sweep.path}"
                       + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
                       + f" (runs: {list(known)})")
  return [known[n] for n in names]


# ----------------------------------------------------------------------------- results

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


def _md_cell(value) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value).replace("|", "\\|").replace("\n", " ")


def write_results(sweep: Sweep, rows: list[dict], workdir: str,
                  sets: Mapping[str, Any] | None = None) -> None:
  """W/results.md, .csv, .json and W/plot.png."""
  sets = dict(sets or {})
  os.makedirs(workdir, exist_ok=True)
  columns = list(rows[0]) if rows else ["run", "status"]
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:  # repr keeps floats exact, so the CSV round-trips
      writer.writerow(["" if row[c] is None else repr(row[c]) if isinstance(row[c], float)
                       else row[c] for c in columns])
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"sweep": sweep.path, "base": sweep.base, "start": sweep.start,
               "set": sets, "metrics": sweep.metrics,
               "plot": list(sweep.plot) if sweep.plot else None, "runs": rows},
              f, indent=1, default=str)

  plotted = plot(sweep, rows, os.path.join(workdir, "plot.png")) if sweep.plot else False
  lines = [f"# Sweep `{sweep.path}`", "",
           f"Base config `{sweep.base}`" + (f" with {sets}" if sets else "")
           + f"; each run redoes the stages from `{sweep.start}` on. "
           f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} runs finished.", "",
           "Metrics: " + "; ".join(f"`{label}` = `{spec}`" if label != spec else f"`{spec}`"
                                   for label, spec in sweep.metrics.items()), "",
           "| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_md_cell(row[c]) for c in columns) + " |" for row in rows]
  if plotted:
    lines += ["", f"![{sweep.plot[1]} against {sweep.plot[0]}](plot.png)"]
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"[sweep] results: {os.path.join(workdir, 'results.md')}")


def plot(sweep: Sweep, rows: list[dict], path: str) -> bool:
  """y against x, one labelled point per finished run; False when no run has both values."""
  x_key, y_key = sweep.plot
  points = [(row[x_key], row[y_key], row["run"]) for row in rows
            if row[x_key] is not None and _number(row[y_key]) is not None]
  if not points:
    log.warning("no finished run has both %r and %r: no plot", x_key, y_key)
    return False
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  numeric = all(not isinstance(x, bool) and _number(x) is not None for x, _, _ in points)
  if numeric:
    xs = [float(_number(x)) for x, _, _ in points]
  else:  # categorical axis, e.g. the RM loss name: categories in order of first appearance
    categories = list(dict.fromkeys(_format_value(x) for x, _, _ in points))
    xs = [categories.index(_format_value(x)) for x, _, _ in points]
  ys = [float(_number(y)) for _, y, _ in points]
  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
  ax.scatter(xs, ys, zorder=3)
  for x, y, (_, _, name) in zip(xs, ys, points):
    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  if numeric:
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


# ----------------------------------------------------------------------------- commands

def _flag_value(value: Any) -> str:
  """How `--config.KEY=VALUE` spells a value so that the config flag parses it back."""
  if isinstance(value, float) and math.isfinite(value):
    return repr(value)
  return str(value)


def commands(sweep: Sweep, workdir: str, *, base: str | None = None,
             runs: Sequence[str] | None = None, sets: Mapping[str, Any] | None = None,
             python: str = "python") -> list[str]:
  """Shell commands: the shared stages first (as a comment; none when --base gives them), one
  per run, and (as a comment) the command that tabulates the results once all are done."""
  sets = dict(sets or {})
  config_flags = [f"--config.{k}={_flag_value(v)}" for k, v in sets.items()]
  stages = base_stages(sweep.start)
  upstream = base or os.path.join(workdir, "base")
  out = []
  if stages and not base:
    out.append("# first, the shared stages: " + shlex.join(
        [python, "-m", "rlhf_jax.pipeline", f"--config={sweep.base}", *config_flags,
         f"--workdir={upstream}", "--only=" + ",".join(stages)]))
  for run in select_runs(sweep, runs):
    args = [python, "-m", "rlhf_jax.pipeline", f"--config={sweep.base}", *config_flags]
    args += [f"--config.{k}={_flag_value(v)}" for k, v in run.overrides.items()]
    args.append(f"--workdir={run_dir(workdir, run.name)}")
    if stages:
      args += [f"--from={sweep.start}", f"--upstream={upstream}"]
    out.append(shlex.join(args))
  tabulate = [python, "-m", "rlhf_jax.sweep", sweep.path, f"--workdir={workdir}", "--collect"]
  tabulate += [f"--base_config={sweep.base}"] if sweep.base_given else []
  tabulate += [f"--set={k}={_flag_value(v)}" for k, v in sets.items()]
  out.append("# then, to tabulate: " + shlex.join(tabulate))
  return out


def main(argv):
  from absl import app, flags
  from rlhf_jax.launch import setup_logging
  flag_values = flags.FLAGS
  if len(argv) != 2:
    raise app.UsageError("give exactly one sweep file: python -m rlhf_jax.sweep "
                         "experiments/<name>/sweep.py --workdir=W")
  setup_logging()
  sweep_path = argv[1]
  runs = [r for r in (flag_values.runs or "").split(",") if r]
  try:
    if flag_values.print_commands:
      sweep, _, sets = prepare(sweep_path, flag_values.base_config or None, flag_values.set)
      print("\n".join(commands(sweep, flag_values.workdir, base=flag_values.base or None,
                               runs=runs, sets=sets)))
      return
    run_sweep(sweep_path, flag_values.workdir, base=flag_values.base or None, runs=runs,
              collect_only=flag_values.collect, base_config=flag_values.base_config or None,
              sets=flag_values.set)
  except (ValueError, FileNotFoundError) as e:  # a bad sweep file or flag: say so, no trace
    sys.exit(f"error: {e}")


def _define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", None, "Where the sweep writes base/, runs/ and results.",
                      required=True)
  flags.DEFINE_string("base", "", "A finished pipeline workdir to take the shared stages from "
                      "instead of running them in <workdir>/base.")
  flags.DEFINE_string("runs", "", "Comma-separated run names: run only these.")
  flags.DEFINE_bool("print_commands", False, "Print one command per run; run nothing.")
  flags.DEFINE_bool("collect", False, "Run nothing; tabulate the runs found on disk.")
  flags.DEFINE_string("base_config", "", "Replaces the sweep file's BASE config spec.")
  flags.DEFINE_multi_string("set", [], "key=value set on the base config of every run, e.g. "
                            "--set=ppo.train.steps=10 (repeatable).")


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
