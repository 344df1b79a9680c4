"""The command line of `python -m rlhf_jax.recipe.sweep` (see the package doc)."""
from __future__ import annotations

import sys

from absl import app, flags

from rlhf_jax.core.logs import setup_logging
from rlhf_jax.recipe.sweep.shell import commands
from rlhf_jax.recipe.sweep.run import run_sweep
from rlhf_jax.recipe.sweep.spec import prepare


def main(argv):
  flag_values = flags.FLAGS
  if len(argv) != 2:
    raise app.UsageError("give exactly one sweep file: python -m rlhf_jax.recipe.sweep "
                         "experiments/<name>/sweep.py --workdir=W")
  setup_logging()
  sweep_path = argv[1]
  runs = [r for r in (flag_values.runs or "").split(",") if r]
  base = flag_values.base or None
  base_config = flag_values.base_config or None
  try:
    if flag_values.print_commands:
      sweep, _, sets = prepare(sweep_path, base_config, flag_values.set)
      print("\n".join(commands(sweep, flag_values.workdir, base=base, runs=runs, sets=sets)))
      return
    run_sweep(sweep_path, flag_values.workdir, base=base, runs=runs,
              collect_only=flag_values.collect, base_config=base_config, sets=flag_values.set)
  except (ValueError, FileNotFoundError) as e:  # a bad sweep file or flag: say so, no trace
    sys.exit(f"error: {e}")


def define_flags() -> None:
  """Defined only when run as a program, so importing the package never adds flags that
  clash with another entry point's --workdir."""
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
  define_flags()
  app.run(main)
