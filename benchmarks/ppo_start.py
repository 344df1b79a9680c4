r"""How long PPO takes to start, and in how much memory, from a pipeline's SFT and RM runs.

Starting PPO builds four models (policy, critic, reference, RM) and fills them from their run
folders. This launches the pipeline's PPO stage on an upstream workdir's finished stages, waits
for the trainer's "PPO: policy ..." line (every model built and loaded, nothing sampled yet),
reads the process's peak resident memory (VmHWM) and stops it. `--trees` runs the same stage
from several source trees (e.g. worktrees of two commits), in the order given, so that two
commits compare on one machine in one run.

  XLA_FLAGS= .venv/bin/python benchmarks/ppo_start.py --upstream workdirs/real-s16-head \
      --config configs/pipeline.py:model=gemma3_270m --trees ../before,.,.,../before
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

READY = "PPO: policy"  # rl/trainer.py logs it once every model is built and loaded


def start_once(tree: str, upstream: str, config: str, extra: list, timeout: float) -> dict:
  """Seconds from launch to READY and the peak RSS by then, for the pipeline in `tree`."""
  tree = os.path.abspath(tree)
  with tempfile.TemporaryDirectory() as workdir:
    log_path = os.path.join(workdir, "stage.log")
    cmd = [sys.executable, "-m", "rlhf_jax.recipe.pipeline", f"--config={config}",
           f"--workdir={os.path.join(workdir, 'w')}", f"--upstream={os.path.abspath(upstream)}",
           "--only=ppo", "--config.skip=kto,dpo", *extra]
    env = {**os.environ, "PYTHONPATH": tree}
    with open(log_path, "w") as log:
      t0 = time.perf_counter()
      proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
      try:
        while proc.poll() is None and time.perf_counter() - t0 < timeout:
          with open(log_path, errors="replace") as f:
            if READY in f.read():
              seconds, peak = time.perf_counter() - t0, common.memory_gib(proc.pid)["peak"]
              return {"tree": tree, "start_s": round(seconds, 2), "peak_rss_gib": round(peak, 3)}
          time.sleep(0.25)
      finally:
        proc.kill()
        proc.wait()
    with open(log_path, errors="replace") as f:
      tail = f.read()[-2000:]
  raise RuntimeError(f"{tree}: the PPO stage did not reach {READY!r} "
                     f"({'exited ' + str(proc.returncode) if proc.returncode else 'timed out'}):"
                     f"\n{tail}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--upstream", required=True, help="a workdir with finished sft and rm")
  parser.add_argument("--config", default="configs/pipeline.py:model=gemma3_270m")
  parser.add_argument("--trees", default=".", help="source trees, comma-separated, run in order")
  parser.add_argument("--timeout", type=float, default=900.0)
  parser.add_argument("--json_out", default="")
  args, extra = parser.parse_known_args()
  result = {"benchmark": "ppo_start", "config": args.config, "upstream": args.upstream,
            "extra": extra, "runs": [], **common.machine_info()}
  for tree in args.trees.split(","):
    result["runs"].append(start_once(tree, args.upstream, args.config, extra, args.timeout))
    common.write_json(result, args.json_out)  # a later tree's failure keeps this one's
  runs = result["runs"]
  print(common.markdown_table(["tree", "start s", "peak RSS GiB"],
                              [[r["tree"], r["start_s"], r["peak_rss_gib"]] for r in runs]))
  common.emit(result, args.json_out)


if __name__ == "__main__":
  main()
