"""A sweep as shell commands, one pipeline invocation per run, for a cluster scheduler: the
same configs `run_sweep` would run, spelled as `--config.KEY=VALUE` flags."""
from __future__ import annotations

import math
import os
import shlex
from typing import Any, Mapping, Sequence

from rlhf_jax.recipe.sweep.spec import Sweep, base_stages, select_runs
from rlhf_jax.recipe.sweep.status import run_dir


def flag_value(value: Any) -> str:
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
  config_flags = [f"--config.{k}={flag_value(v)}" for k, v in sets.items()]
  pipeline_args = [python, "-m", "rlhf_jax.recipe.pipeline", f"--config={sweep.base}",
                   *config_flags]
  stages = base_stages(sweep.start)
  upstream = base or os.path.join(workdir, "base")
  out = []
  if stages and not base:
    out.append("# first, the shared stages: " + shlex.join(
        pipeline_args + [f"--workdir={upstream}", "--only=" + ",".join(stages)]))
  for run in select_runs(sweep, runs):
    args = pipeline_args + [f"--config.{k}={flag_value(v)}" for k, v in run.overrides.items()]
    args.append(f"--workdir={run_dir(workdir, run.name)}")
    if stages:
      args += [f"--from={sweep.start}", f"--upstream={upstream}"]
    out.append(shlex.join(args))
  tabulate = [python, "-m", "rlhf_jax.recipe.sweep", sweep.path, f"--workdir={workdir}",
              "--collect"]
  tabulate += [f"--base_config={sweep.base}"] if sweep.base_given else []
  tabulate += [f"--set={k}={flag_value(v)}" for k, v in sets.items()]
  out.append("# then, to tabulate: " + shlex.join(tabulate))
  return out
