r"""Ablation sweeps from config files: one shared base pipeline, then one pipeline run per variant.

  python -m rlhf_jax.recipe.sweep experiments/kl_sweep/sweep.py --workdir=W [--base=W0] \
      [--runs=NAME,NAME] [--print_commands] [--collect] [--base_config=SPEC] [--set=KEY=VALUE]

A sweep file is a Python module that defines

  get_sweep()  a list of runs, each a dict {dotted pipeline-config key: value}, e.g.
               {"ppo.kl.coef": 0.0, "ppo.kl.adaptive": False}; `product` and `zipped` (spec.py)
               build such lists ("_name" in a dict names the run instead of its overrides)
  BASE         the config every run starts from, "configs/pipeline.py:size=small"
  START        the first stage each run redoes; the stages before it run once, in W/base (or
               come from --base=W0, a finished pipeline workdir), and every run reads them there
  METRICS      {column label: metric spec}, or a list of specs (each its own label)
  PLOT         (x, y): metric labels to plot across runs; x may also be an override key
  SET          optional {dotted key: value} set on the base config of every run, as --set
               does (e.g. {"skip": "kto,dpo"} when no metric reads KTO or DPO)

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
changing it per run would silently do nothing) is an error too. The shared stages count as
finished, or stale, exactly when the pipeline itself would say so (`pipeline.stage_status`).

The package by concern: spec (the sweep file, its runs and names, the metric-spec language),
overrides (setting dotted keys on the config), status (how far each run got), run (the base
and the runs), results (metrics, tables, plot), shell (--print_commands), __main__ (flags).
"""
from rlhf_jax.recipe.sweep.shell import commands, flag_value
from rlhf_jax.recipe.sweep.overrides import (NAME_KEY, apply_overrides, check_key, leaf_keys,
                                             parse_set)
from rlhf_jax.recipe.sweep.results import (as_number, collect, markdown, plot, read_source,
                                           resolve_metric, write_results)
from rlhf_jax.recipe.sweep.run import (prepare_base, run_selected, run_sweep, run_variant,
                                       stages_by_status)
from rlhf_jax.recipe.sweep.spec import (SOURCE_FILES, Run, Sweep, base_stages, check_metric_spec,
                                        check_overrides, format_value, load_sweep, prepare,
                                        policy_diagnostics, product, run_names, select_runs,
                                        short_keys, source_path, zipped)
from rlhf_jax.recipe.sweep.status import FAILED_FILE, RUN_FILE, run_dir, run_status
