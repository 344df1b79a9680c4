"""One table of every workload: this machine's run beside the figures recorded for each CPU kind.

`make bench` writes each benchmark's JSON into one directory; this reads them, takes each
workload's headline (the row of its dtype, the metric named in recorded.json), and prints it
beside the figures benchmarks/RESULTS.md records for the AVX2 and the AVX-512 BF16 machines
(benchmarks/recorded.json, each with its section). A workload whose JSON is missing (its
benchmark failed or was skipped) says so instead of a number. The CPU kind of this machine is
read from /proc/cpuinfo's flags.

  python benchmarks/summary.py --dir workdirs/bench [--recorded benchmarks/recorded.json]

Prints one JSON object, then the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_kind(flags: str) -> str:
  """'avx512_bf16' when the CPU multiplies bfloat16 natively, else 'avx2' (the two kinds the
  recorded figures come from; anything older is reported as avx2 too)."""
  return "avx512_bf16" if "avx512_bf16" in flags.split() else "avx2"


def this_cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next((line.split(":", 1)[1] for line in f if line.startswith("flags")), "")
  except OSError:
    return ""


def headline(workload: dict, bench_dir: str) -> dict:
  """{'value': float or None, 'text': str, 'extra': str} of a workload in this run's JSON."""
  path = os.path.join(bench_dir, workload["file"])
  if not os.path.exists(path):
    return {"value": None, "text": f"not run ({workload['file']} missing)", "extra": ""}
  with open(path, encoding="utf-8") as f:
    result = json.load(f)
  rows = [r for r in result.get("results", []) if r.get("dtype") == workload["dtype"]
          and r.get("layout", workload.get("layout")) == workload.get("layout")]
  if not rows or workload["metric"] not in rows[0]:
    return {"value": None, "extra": "",
            "text": f"no {workload['dtype']} {workload['metric']} in {workload['file']}"}
  row = rows[0]
  value = float(row[workload["metric"]])
  text = f"{value:.2f}x" if workload["format"] == "ratio" else f"{value:,.0f}/s"
  extra = []
  if workload.get("rate") in row:
    extra.append(f"{row[workload['rate']]:,.1f} {workload['rate'].replace('_per_s', '/s')}")
  if "mfu" in row and isinstance(row["mfu"], (int, float)):
    extra.append(f"MFU {100 * row['mfu']:.0f}%")
  if "peak_rss_gib" in row:
    extra.append(f"{row['peak_rss_gib']:.2f} GiB")
  return {"value": value, "text": text, "extra": ", ".join(extra)}


def build(bench_dir: str, recorded: dict, kind: str) -> list[dict]:
  rows = []
  for workload in recorded["workloads"]:
    here = headline(workload, bench_dir)
    rows.append({"workload": workload["name"], "what": workload["what"], "this_run": here,
                 "recorded": {k: workload["recorded"][k]["value"] for k in recorded["kinds"]},
                 "kind": kind})
  return rows


def table(rows: list[dict], recorded: dict, kind: str) -> str:
  kinds = list(recorded["kinds"])
  header = ["workload", "what", f"this run ({kind})"] + [f"recorded, {k}" for k in kinds]
  body = []
  for r in rows:
    here = r["this_run"]["text"] + (f" ({r['this_run']['extra']})" if r["this_run"]["extra"]
                                    else "")
    body.append([r["workload"], r["what"], here] + [r["recorded"][k] for k in kinds])
  return common.markdown_table(header, body)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dir", required=True, help="the directory make bench wrote its JSON into")
  p.add_argument("--recorded", default=os.path.join(HERE, "recorded.json"))
  args = p.parse_args()
  with open(args.recorded, encoding="utf-8") as f:
    recorded = json.load(f)
  kind = cpu_kind(this_cpu_flags())
  rows = build(args.dir, recorded, kind)
  common.emit({"benchmark": "summary", "kind": kind, "machine": common.machine_info(),
               "rows": rows})
  print()
  for name, about in recorded["kinds"].items():
    print(f"{name}: {about}")
  print()
  print(table(rows, recorded, kind))


if __name__ == "__main__":
  main()
