"""What a sweep is: its runs (`product`, `zipped`), their names, the sweep file that lists them,
the metric-spec language, and the checks that fail a bad sweep before anything runs."""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from rlhf_jax.config import util as config_util
from rlhf_jax.core.langs import LANGS
from rlhf_jax.recipe import pipeline
from rlhf_jax.recipe.sweep.overrides import NAME_KEY, apply_overrides, parse_set

# Metric sources with a name of their own; any other source is a stage or a path.
SOURCE_FILES = {"summary": "summary.json", "results": os.path.join("evaluate", "results.json")}
TABLE_COLUMNS = ("run", "status", "error")  # the table's columns besides overrides and metrics
MAX_NAME = 96  # characters in a run name: paths stay short on every filesystem


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


# ----------------------------------------------------------------------------- metric specs

def policy_diagnostics(policy: str = "ppo", langs: Sequence[str] = LANGS) -> dict[str, str]:
  """The metric specs of one policy's verdict and the diagnostics behind it, per language
  (eval/diagnostics.py, in the evaluate stage's results): a sweep that reports a win rate
  reports beside it the check scorer's win, the same-script win, the diversity and the verdict.
  Labels are `<what>_<lang>`, e.g. `check_win_zh`."""
  fields = {"verdict": "verdicts.{p}.langs.{l}.verdict",
            "gold_win": "diagnostics.{p}.{l}.gold_win",
            "check_win": "diagnostics.{p}.{l}.check_win",
            "same_script_win": "diagnostics.{p}.{l}.same_script_win",
            "unique": "diagnostics.{p}.{l}.unique_answers",
            "greedy_distinct": "diagnostics.{p}.{l}.greedy_distinct",
            "length": "diagnostics.{p}.{l}.mean_length",
            "sft_length": "diagnostics.sft.{l}.mean_length"}
  return {f"{name}_{lang}": "results:" + key.format(p=policy, l=lang)
          for lang in langs for name, key in fields.items()}


# ----------------------------------------------------------------------------- run names

def format_value(value: Any) -> str:
  """An override value as a run name (and a plot's category) shows it: 0.05, true, 1-2."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "-".join(format_value(v) for v in value)
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
  short = short_keys(k for run in runs for k in run if k != NAME_KEY)
  names, seen = [], set()
  for run in runs:
    if NAME_KEY in run:
      name = _safe(str(run[NAME_KEY]))
    else:
      name = _safe("+".join(f"{short[k]}={format_value(v)}" for k, v in run.items())
                   or "default")
    if len(name) > MAX_NAME:  # keep paths short; the hash keeps them unique
      digest = hashlib.sha1(name.encode()).hexdigest()[:8]
      name = name[:MAX_NAME - 9] + "-" + digest
    base, n = name, 1
    while name in seen:
      n += 1
      name = f"{base}-{n}"
    seen.add(name)
    names.append(name)
  return names


# ----------------------------------------------------------------------------- metric specs

def source_path(source: str) -> str:
  """Where a metric source lives, relative to a run's workdir."""
  if source in SOURCE_FILES:
    return SOURCE_FILES[source]
  if source.endswith((".json", ".jsonl")):
    return source
  return os.path.join(source, "metrics.jsonl")


def check_metric_spec(spec: str, where: str = "") -> None:
  """Raises ValueError unless `spec` is SOURCE:KEY with a source `source_path` knows."""
  source, sep, key = spec.partition(":")
  stages = pipeline.STAGES
  if not sep or not key:
    raise ValueError(f"{where}metric {spec!r} is not of the form SOURCE:KEY (e.g. "
                     "'ppo:objective/kl', 'results:metrics.ppo.en.gold')")
  if source in SOURCE_FILES or source in stages or source.endswith((".json", ".jsonl")):
    return
  close = difflib.get_close_matches(source, list(SOURCE_FILES) + list(stages), n=2)
  raise ValueError(f"{where}metric {spec!r}: unknown source {source!r}"
                   + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")
                   + f" (known: {sorted(SOURCE_FILES)}, a stage of {list(stages)}, or a path "
                   "ending in .json / .jsonl)")


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
  sets: dict = dataclasses.field(default_factory=dict)  # SET: overrides of every run

  @property
  def override_keys(self) -> list[str]:
    return list(dict.fromkeys(k for run in self.runs for k in run.overrides))


def base_stages(start: str) -> list[str]:
  """The stages the runs share: every one before START."""
  return list(pipeline.STAGES[:pipeline.STAGES.index(start)])


def _load_module(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"no sweep file {path}")
  module_spec = importlib.util.spec_from_file_location(
      "sweep_file_" + re.sub(r"\W", "_", os.path.abspath(path)), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  where = f"{path}: "
  for attr in ("get_sweep", "BASE", "START", "METRICS"):
    if not hasattr(module, attr):
      raise ValueError(f"{where}a sweep file must define {attr} (see rlhf_jax/recipe/sweep/)")
  if module.START not in pipeline.STAGES:
    raise ValueError(f"{where}START={module.START!r} is not a stage; stages: "
                     f"{list(pipeline.STAGES)}")
  return module


def _load_runs(module, where: str) -> list[Run]:
  raw = module.get_sweep()
  if not isinstance(raw, (list, tuple)) or not raw:
    raise ValueError(f"{where}get_sweep() must return a non-empty list of dicts, got {raw!r}")
  for i, run in enumerate(raw):
    if not isinstance(run, Mapping):
      raise ValueError(f"{where}run {i} of get_sweep() is not a dict: {run!r}")
  return [Run(name, {k: v for k, v in run.items() if k != NAME_KEY})
          for name, run in zip(run_names(raw), raw)]


def _load_metrics(module, keys: set, where: str) -> dict[str, str]:
  metrics = module.METRICS
  if isinstance(metrics, str):
    raise ValueError(f"{where}METRICS must be a list of specs or a dict label -> spec")
  metrics = dict(metrics) if isinstance(metrics, Mapping) else {m: m for m in metrics}
  for spec in metrics.values():
    check_metric_spec(spec, where)
  clash = sorted(set(metrics) & (keys | set(TABLE_COLUMNS)))
  if clash:
    raise ValueError(f"{where}METRICS labels {clash} clash with the table's other columns "
                     f"({', '.join(TABLE_COLUMNS)} and the override keys): rename them")
  return metrics


def _load_plot(module, metrics: Mapping[str, str], keys: set,
               where: str) -> tuple[str, str] | None:
  plot = getattr(module, "PLOT", None)
  if plot is None:
    return None
  if len(plot) != 2:
    raise ValueError(f"{where}PLOT must be (x, y), got {plot!r}")
  x, y = plot
  if x not in metrics and x not in keys:
    raise ValueError(f"{where}PLOT x {x!r} is neither a METRICS label {list(metrics)} "
                     f"nor an override key {sorted(keys)}")
  if y not in metrics:
    raise ValueError(f"{where}PLOT y {y!r} is not a METRICS label {list(metrics)}")
  return x, y


def load_sweep(path: str) -> Sweep:
  """Reads and checks a sweep file (not its overrides: those need the config, see `prepare`)."""
  module = _load_module(path)
  where = f"{path}: "
  runs = _load_runs(module, where)
  keys = {k for run in runs for k in run.overrides}
  metrics = _load_metrics(module, keys, where)
  sets = getattr(module, "SET", {})
  if not isinstance(sets, Mapping):
    raise ValueError(f"{where}SET must be a dict {{dotted key: value}}, got {sets!r}")
  return Sweep(path=path, base=module.BASE, start=module.START, runs=runs, metrics=metrics,
               plot=_load_plot(module, metrics, keys, where), sets=dict(sets))


def check_overrides(sweep: Sweep, config) -> None:
  """Every run's overrides name real fields of a stage the run redoes; raises before any run."""
  shared = set(base_stages(sweep.start))
  for i, run in enumerate(sweep.runs):
    where = f"{sweep.path}, run {i} ({run.name}): "
    apply_overrides(config, run.overrides, where)
    for key in run.overrides:
      section = key.split(".", 1)[0]
      if section in shared:
        raise ValueError(
            f"{where}{key!r} changes stage {section!r}, which runs before START={sweep.start!r} "
            f"and is shared by every run; set START={section!r} to redo it per run")


def prepare(sweep_path: str, base_config: str | None = None, sets: Sequence[str] = ()):
  """(sweep, its base config with the file's SET and then `sets` applied, {key: value} of them
  all), every run's overrides checked against that config."""
  sweep = load_sweep(sweep_path)
  if base_config:
    sweep.base, sweep.base_given = base_config, True
  config = config_util.load_config(sweep.base)
  config = apply_overrides(config, sweep.sets, f"{sweep_path}: SET: ")
  flag_values = dict(parse_set(s, config) for s in sets)
  config = apply_overrides(config, flag_values, "--set: ")
  set_values = {**sweep.sets, **flag_values}
  check_overrides(sweep, config)
  return sweep, config, set_values


def select_runs(sweep: Sweep, names: Sequence[str] | None) -> list[Run]:
  """The runs named (every run when none is), in the order named; an unknown name is an error
  naming the closest runs."""
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
