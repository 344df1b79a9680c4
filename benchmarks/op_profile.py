"""Where a PPO phase's time goes, op by op: XLA's CPU profiler, each op put in a category.

`ppo_iteration.py` says how far an iteration is from its matmul floor; this script says what
the rest is. It builds the same workload (`ppo_iteration.build_workload`: W1 by default, the
same flags), runs the phase once to compile, then traces `--calls` calls with `jax.profiler`
and reads the trace back (`jax.profiler.ProfileData`). Every event on XLA's worker threads is
one executed HLO instruction; the compiled HLO's metadata says which source op it came from,
and the instruction whether it is a matmul (a dot, or a library fusion around one). Each op's
time goes to one row:

- **what**: matmul or elementwise (everything else: fusions of norms, softmax, rotary,
  layout copies, the optimizer's arithmetic, reductions);
- **where**: attention projections (q/k/v/o), attention itself (scores, softmax, rotary,
  masks, head transposes), MLP, norms, the vocabulary projection and what reads it
  (log-softmax, entropy), outside the models (in the update: the optimizer), other (the
  loss's own arithmetic on [B, N] arrays, the value head);
- **pass**: forward, backward (autodiff's transpose), or no gradient (the update's optimizer
  and statistics, the score phase's every op).

Op time is summed over XLA's threads: where XLA runs two independent ops at once (two
cores), op time exceeds the wall time, and an op's time is its own wall time while it shared
the machine. Compare rows within one run; the wall time per call is printed beside them.

  XLA_FLAGS= .venv/bin/python benchmarks/op_profile.py [--phase update|score|generate]
      [--dtypes float32] [--calls 2] [--top 15] [ppo_iteration.py's workload flags]

Prints one JSON object, then a Markdown table per dtype. Timings are never asserted.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import common  # noqa: E402
import ppo_iteration  # noqa: E402

# An instruction line of XLA's HLO text: `%name = type op(...)...calls=%comp...op_name="..."`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\][^ ]* ([\w\-]+)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_LEAF_PATH = re.compile(r"\[\\?'")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")

WHERE = (  # first match wins, on the source op's scope path
    # q, k, v by their scopes; o is the attention scope's own dot (the scores' are einsums)
    ("attention projections", re.compile(r"/attn/(q|k|v)/|/attn/dot_general")),
    ("attention", re.compile(r"/attn/")),  # scores, softmax, masks, rotary, head layouts
    ("mlp", re.compile(r"/mlp/")),
    ("norms", re.compile(r"norm/")),
    ("vocabulary", re.compile(r"lm_head|embed|project|log_softmax|logsumexp|entropy")),
)


def instruction_info(hlo_text: str) -> dict[str, dict]:
  """{instruction name: {"op_name", "matmul"}} of every instruction in compiled HLO text.

  An instruction is a matmul when it is a `dot`, or a fusion or custom call whose called
  computation holds a dot (XLA:CPU's YNNPACK/oneDNN fusions wrap a dot with the elementwise
  work around it: that time counts as the matmul's)."""
  bodies, current = collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group(1)
      continue
    if line.startswith("}"):
      current = None
    elif current is not None:
      bodies[current].append(line)
  has_dot = {name: any(" dot(" in line for line in lines) for name, lines in bodies.items()}
  info = {}
  for lines in bodies.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      name, _, dims, op = m.groups()
      calls = _CALLS.search(line)
      matmul = op == "dot" or bool(calls and has_dot.get(calls.group(1), False)
                                   and op in ("fusion", "custom-call"))
      op_name = _OP_NAME.search(line)
      info[name] = {"op_name": op_name.group(1) if op_name else "", "matmul": matmul,
                    "shape": tuple(int(d) for d in dims.split(",") if d)}
  return info


def categorize(op_name: str, matmul: bool, shape: tuple = (),
               vocab_size: int = 0) -> tuple[str, str, str]:
  """(what, where, pass) of one op, from its source op name, whether it is a matmul and its
  output shape: an unscoped op inside the gradient whose last axis is the vocabulary's (the
  loss's log-softmax over chunks of logits) counts as the vocabulary's. (Outside a gradient
  the same op is "outside the models", beside the optimizer's updates of the [D, V] head.)"""
  what = "matmul" if matmul else "elementwise"
  if "transpose(jvp(" in op_name:
    pass_ = "backward"
  elif "jvp(" in op_name:
    pass_ = "forward"
  else:
    pass_ = "no gradient"
  # An op named after one param leaf ("state.params['critic']['trunk']['embed']...", escaped
  # in HLO text) copies or updates the leaf: not the model's work whatever the leaf is called.
  scoped = not _LEAF_PATH.search(op_name)
  where = next((label for label, pattern in WHERE if scoped and pattern.search(op_name)), None)
  if where is None and pass_ != "no gradient" and vocab_size and shape and shape[-1] == vocab_size:
    where = "vocabulary"
  if where == "attention projections" and not matmul:
    where = "attention"  # the projections' elementwise neighbours (head reshapes, bias)
  if where is None:
    where = "outside the models" if pass_ == "no gradient" else "other"
  return what, where, pass_


def summarize(events, info: dict[str, dict], vocab_size: int = 0) -> dict:
  """Nanoseconds by (what, where, pass) and by op, from (instruction name, duration ns) pairs.
  Names that are no instruction (the runtime's own events) are left out and counted."""
  by_row, by_op, unknown = collections.Counter(), collections.Counter(), 0
  for name, ns in events:
    if name not in info:
      unknown += ns
      continue
    by_row[_categorize(info[name], vocab_size)] += ns
    by_op[name] += ns
  return {"by_row": by_row, "by_op": by_op, "runtime_ns": unknown}


def _categorize(instruction: dict, vocab_size: int) -> tuple[str, str, str]:
  return categorize(instruction["op_name"], instruction["matmul"], instruction["shape"],
                    vocab_size)


def trace_events(fn, calls: int) -> tuple[list[tuple[str, int]], float]:
  """(events, wall seconds per call): `fn()` traced `calls` times, the events of XLA's CPU
  worker threads as (name, duration ns)."""
  with tempfile.TemporaryDirectory() as out:
    t0 = time.perf_counter()
    with jax.profiler.trace(out):
      for _ in range(calls):
        fn()
    wall = (time.perf_counter() - t0) / calls
    path = sorted(glob.glob(os.path.join(out, "**", "*.xplane.pb"), recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(path)
  events = [(ev.name, ev.duration_ns) for plane in data.planes if plane.name == "/host:CPU"
            for line in plane.lines if line.name.startswith("tf_XLA")
            for ev in line.events]
  return events, wall


def profile_phase(args, dtype: str) -> dict:
  if args.phase not in ("update", "score"):
    raise ValueError(f"--phase {args.phase}: update or score (generation is a host loop of "
                     "decode calls: profile it with generate.py)")
  w = ppo_iteration.build_workload(args, dtype)
  ro = jax.block_until_ready(w.rollout_fn({"params": w.state.params["policy"]}, w.prompts,
                                          w.prompt_mask, jax.random.key(0)))
  score_args = (w.state.params, w.frozen, ro, w.state.kl_coef)
  score = w.experience_fn.lower(*score_args).compile()  # compiled once, for both phases
  exp, _ = jax.block_until_ready(score(*score_args))
  if args.phase == "update":
    compiled, box = w.update_fn.lower(w.state, exp, None).compile(), {"state": w.state}

    def call():  # the state is donated: each call feeds the next
      box["state"], _ = jax.block_until_ready(compiled(box["state"], exp, None))
  else:
    compiled = score
    call = lambda: jax.block_until_ready(score(*score_args))  # noqa: E731
  call()
  events, wall = trace_events(call, args.calls)
  info = instruction_info(compiled.as_text())
  summary = summarize(events, info, w.cfg.vocab_size)
  op_total = sum(summary["by_row"].values())
  per_call = lambda ns: ns / args.calls / 1e9  # noqa: E731
  rows = [{"what": what, "where": where, "pass": pass_, "seconds": per_call(ns),
           "fraction_of_op_time": ns / op_total}
          for (what, where, pass_), ns in summary["by_row"].most_common()]
  top = [{"op": name, "seconds": per_call(ns),
          "what_where_pass": list(_categorize(info[name], w.cfg.vocab_size)),
          "source": info[name]["op_name"][-120:]}
         for name, ns in summary["by_op"].most_common(args.top)]
  return {"dtype": dtype, "phase": args.phase, "calls": args.calls, "wall_s_per_call": wall,
          "op_s_per_call": per_call(op_total), "runtime_s_per_call": per_call(
              summary["runtime_ns"]), "rows": rows, "top_ops": top}


def main(argv=None):
  p = ppo_iteration.make_parser(__doc__.split("\n\n")[0])
  p.add_argument("--phase", default="update", choices=["update", "score"])
  p.add_argument("--calls", type=int, default=2, help="traced calls (after one untraced)")
  p.add_argument("--top", type=int, default=15, help="the most expensive ops listed")
  p.set_defaults(dtypes="float32")
  args = p.parse_args(argv)
  results = [profile_phase(args, d.strip()) for d in args.dtypes.split(",") if d.strip()]
  common.emit({"benchmark": "op_profile", "workload": {
      k: getattr(args, k) for k in ("size", "prompts", "prompt_len", "new_tokens", "epochs",
                                    "minibatches", "optimizer", "scan_layers", "remat")},
      "machine": {**common.machine_info(), "jax": jax.__version__}, "results": results},
      args.json_out)
  for r in results:
    print(f"\n{r['phase']} at {r['dtype']}: {r['wall_s_per_call']:.2f} s wall a call, "
          f"{r['op_s_per_call']:.2f} s of op time over XLA's threads")
    totals = collections.Counter()
    for row in r["rows"]:
      totals[(row["what"], row["where"])] += row["seconds"]
    print(common.markdown_table(
        ["what", "where", "s a call", "% of op time"],
        [[what, where, f"{s:.3f}", f"{100 * s / r['op_s_per_call']:.1f}%"]
         for (what, where), s in totals.most_common()]))
    print()
    print(common.markdown_table(
        ["op", "s a call", "what / where / pass", "source"],
        [[t["op"], f"{t['seconds']:.3f}", " / ".join(t["what_where_pass"]),
          t["source"][-70:]] for t in r["top_ops"]]))


if __name__ == "__main__":
  main()
