"""PPO iteration speed on the W1 workload: episodes/s, the generate / score / update split, MFU.

W1 (the workload every peer is compared on, see DESIGN.md): policy, reference, critic and
reward model each a decoder of 4 layers, d_model 256, 4 heads, SwiGLU 1024, vocab 8192
(size "w1"), params float32; 64 prompts of 32 tokens; 48 sampled tokens each with no early
stop; RM score, per-token KL, GAE; 4 epochs x 4 minibatches. The functions timed are the
trainer's own (rl/rollout.py, rl/ppo.py) with configs/ppo.py's optimizer; only the data is
random (prompts and params drawn in numpy: values do not change the cost).

MFU is measured against a large matmul timed in the same run at the same dtype
(`common.jax_matmul_peak`: the faster of float32 and native output), never against a
datasheet: on a shared CPU the absolute numbers move with the load, the ratio much less. Each
phase is also timed in process CPU-seconds (all threads), which other jobs disturb less.
Model FLOPs count matmuls only (`ModelConfig.flops_per_token`); a training forward+backward is
3x the forward. The update's FLOPs per epoch: the policy and the critic over all B x (P + N)
positions in every layer but the last, which runs its queries, attention and MLP on the N
answer columns only; the vocabulary projection on the N answer positions only for the policy,
none for the critic.

At bfloat16 compute, log pi_old is recomputed by a policy forward pass in the score phase
(configs/ppo.py's old_logprobs="auto"): a bfloat16 KV-cache decode rounds differently from a
full pass, so the sampler's log-probs would start the ratio away from 1.

  XLA_FLAGS= .venv/bin/python benchmarks/ppo_iteration.py [--dtypes float32,bfloat16]
      [--iterations 3] [--peer_json TRL.json] [--json_out FILE]

The "matmuls alone" column is each phase's projection matmuls run back to back with nothing
else (`phase_matmuls`, the forms the model uses), and "bound vs TRL" is TRL's iteration over
that: no implementation doing this arithmetic in these matmul forms on this machine can be
faster than that ratio.

The speed-up column compares with TRL's PPO trainer on the same workload: the JSON that
benchmarks/peers/trl_ppo.py wrote in the same session when --peer_json is given (run the two
back to back), else DESIGN.md's figure for a quiet machine.

Prints one JSON object, then a Markdown table. Timings are never asserted.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import resource
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from rlhf_jax.config import util as config_util  # noqa: E402
from rlhf_jax.core import host_memory  # noqa: E402
from rlhf_jax.core.compiled_memory import executable_memory  # noqa: E402
from rlhf_jax.models import ScalarModel, Transformer, model_config  # noqa: E402
from rlhf_jax.rl import ppo  # noqa: E402
from rlhf_jax.infer.rollout import make_rollout_fn  # noqa: E402
from rlhf_jax.rl import trainer as ppo_trainer  # noqa: E402

# Hugging Face TRL 1.9.0 + torch 2.13 on this kind of 2-core CPU, float32 (DESIGN.md): a
# reference figure from an earlier measurement, not a number measured by this script.
TRL_REFERENCE = {"iteration_s": 14.6, "generate_s": 1.5, "score_s": 1.5, "update_s": 11.5}


def make_parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
  """The workload's flags (shared with op_profile.py) and this script's own."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--size", default="w1")
  p.add_argument("--prompts", type=int, default=64)
  p.add_argument("--prompt_len", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=48)
  p.add_argument("--epochs", type=int, default=4)
  p.add_argument("--minibatches", type=int, default=4)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--iterations", type=int, default=3, help="timed iterations (after 1 warm-up)")
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--matmul_repeats", type=int, default=10)
  p.add_argument("--old_logprobs", default="auto", choices=["auto", "sampler", "recompute"],
                 help="configs/ppo.py's ppo.old_logprobs")
  p.add_argument("--peer_json", default="",
                 help="the JSON of benchmarks/peers/trl_ppo.py from the same session: the "
                      "speed-up is then against that measurement, not DESIGN.md's figure")
  p.add_argument("--remat", type=int, default=0,
                 help="1: the four models rematerialise each layer in the update's backward "
                      "(model.remat): less memory, one more forward")
  p.add_argument("--scan_layers", type=int, default=0,
                 help="1: the four models run their layers as one lax.scan over stacked "
                      "weights (model.scan_layers); with --remat 1 the update keeps one "
                      "layer's activations, not thirty")
  p.add_argument("--optimizer", default="joint", choices=["joint", "per_model"],
                 help="configs/ppo.py's ppo.optimizer: one optimizer and clip over policy and "
                      "critic (TRL's), or one per model, the policy's step before the critic's "
                      "pass (one model's gradient held at a time)")
  p.add_argument("--floor", type=int, default=1,
                 help="also time each phase's projection matmuls alone (phase_matmuls)")
  p.add_argument("--json_out", default="")
  return p


def parse_args(argv=None):
  return make_parser().parse_args(argv)


def random_params(module, seed: int):
  """Params of the module's tree drawn in numpy (skips compiling an initialiser)."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), tokens, tokens, tokens))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(leaf.shape, jnp.float32)
    if "bias" in name:
      return jnp.zeros(leaf.shape, jnp.float32)
    fan_in = leaf.shape[0] if "embedding" not in name else 1
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def workload_flops(cfg, batch: int, prompt_len: int, new_tokens: int, epochs: int,
                   recompute: bool) -> dict:
  """Matmul FLOPs of each phase of one iteration (see the module docstring)."""
  s = prompt_len + new_tokens
  per_layer = cfg.flops_per_token(s, with_logits=False) / cfg.n_layers  # per token
  kv = 2 * 2 * cfg.d_model * cfg.dim_per_head * cfg.n_kv_heads

  def trunk(columns, read):
    """`columns` per sequence through every layer but the last, which computes keys and
    values on all of them and queries, attention and MLP on `read` columns only."""
    return batch * (per_layer * (cfg.n_layers - 1) * columns + kv * columns
                    + (per_layer - kv) * read)

  logits = 2 * cfg.d_model * cfg.vocab_size * batch  # per column projected to the vocabulary
  # The policy and the critic read the N answer columns (`answer_columns`), the RM every one.
  policy_fwd = trunk(s, new_tokens) + logits * new_tokens
  # Generation: prefill reading the last prompt column, then one token per step, attending
  # over the whole cache of s slots.
  generate = (trunk(prompt_len, 1) + logits
              + (cfg.flops_per_token(s, with_logits=True) * batch * (new_tokens - 1)))
  score = policy_fwd + trunk(s, new_tokens) + trunk(s, s) + (policy_fwd if recompute else 0)
  update = epochs * 3 * (policy_fwd + trunk(s, new_tokens))
  return {"generate": generate, "score": score, "update": update}


def phase_matmuls(cfg, batch: int, prompt_len: int, new_tokens: int, minibatches: int) -> dict:
  """The projection matmuls of each phase as {phase: [(count, train, [(M, K, F), ...])]}.

  The same shapes `workload_flops` counts, minus attention's two matmuls (about 4% of W1's
  FLOPs): a `train` set also runs both backward matmuls. Timed alone, with nothing between
  them, they give each phase's floor: no implementation that runs these matmuls (XLA's, at
  these shapes and in this dtype) on this machine can be faster.
  """
  d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layers
  q, kv = cfg.n_heads * cfg.dim_per_head, cfg.n_kv_heads * cfg.dim_per_head
  kv_part = [(d, kv), (d, kv)]
  rest = [(d, q), (q, d), (d, f), (d, f), (f, d)]  # q, o, gate, up, down

  def trunk(m_all, m_read):  # the last layer runs q, attention and MLP on m_read rows only
    return ([(m_all, k, n) for _ in range(L - 1) for k, n in kv_part + rest]
            + [(m_all, k, n) for k, n in kv_part] + [(m_read, k, n) for k, n in rest])

  s, b = prompt_len + new_tokens, batch // minibatches
  policy_mb = trunk(b * s, b * new_tokens) + [(b * new_tokens, d, cfg.vocab_size)]
  critic_mb = trunk(b * s, b * new_tokens)
  policy = trunk(batch * s, batch * new_tokens) + [(batch * new_tokens, d, cfg.vocab_size)]
  return {
      "generate": [(1, False, trunk(batch * prompt_len, batch) + [(batch, d, cfg.vocab_size)]),
                   (new_tokens - 1, False, trunk(batch, batch) + [(batch, d, cfg.vocab_size)])],
      # reference (policy-shaped), critic (answer columns), RM (every column)
      "score": [(1, False, policy + trunk(batch * s, batch * new_tokens)
                 + trunk(batch * s, batch * s))],
      "update": [(minibatches, True, policy_mb + critic_mb)],
  }


def matmul_floor(cfg, args, dtype: str, repeats: int = 5) -> dict:
  """{"seconds": {phase: s}, "flops": {phase: FLOPs}}: each phase's matmuls run back to back in
  one jitted call per set, through `dense` (float32: plain dots and autodiff's backward; bf16:
  the model's own mixed-precision forms), repeated as often as the phase runs them."""
  from rlhf_jax.models.dot import dense
  rng = np.random.default_rng(3)

  def run_set(shapes, train):
    xs = [jnp.asarray(rng.standard_normal((m, k)), jnp.float32) for m, k, _ in shapes]
    ws = [jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
          for _, k, n in shapes]
    gs = [jnp.asarray(rng.standard_normal((m, n)), dtype) for m, _, n in shapes]

    def one(x, w, g):
      if not train:
        return dense(x.astype(dtype), w, dtype)
      y, vjp = jax.vjp(lambda x, w: dense(x, w, dtype), x.astype(dtype), w)
      return (y, *vjp(g))
    fn = jax.jit(lambda xs, ws, gs: [one(*a) for a in zip(xs, ws, gs)])
    call = lambda: jax.block_until_ready(fn(xs, ws, gs))  # noqa: E731
    return common.median_seconds(call, repeats)[0]

  seconds, flops = {}, {}
  for phase, sets in phase_matmuls(cfg, args.prompts, args.prompt_len, args.new_tokens,
                                   args.minibatches).items():
    reps = args.epochs if phase == "update" else 1
    seconds[phase] = sum(reps * count * run_set(shapes, train) for count, train, shapes in sets)
    flops[phase] = sum(reps * count * (3 if train else 1)
                       * sum(2 * m * k * n for m, k, n in shapes) for count, train, shapes in sets)
  return {"seconds": seconds, "flops": flops}


def build_workload(args, dtype: str) -> types.SimpleNamespace:
  """The W1-style workload of `args` at `dtype`: state, frozen models, prompts and the
  trainer's three jitted phases (rollout, experience, update), as the PPO trainer builds them;
  only the data and params are random. Shared with op_profile.py."""
  config = config_util.load_config(f"configs/ppo.py:size={args.size}")
  with config.unlocked():
    config.model.dtype = dtype
    config.ppo.epochs, config.ppo.minibatches = args.epochs, args.minibatches
    config.ppo.penalize_missing_eos = False  # no stop ids: every answer runs the full budget
    config.kl.adaptive = False
    config.ppo.old_logprobs = args.old_logprobs
    config.ppo.optimizer = args.optimizer
  hyper = ppo_trainer.hyper_from_config(config)
  controller = ppo_trainer.controller_from_config(config)
  cfg = model_config(args.size, dtype=dtype, remat=bool(args.remat),
                     scan_layers=bool(args.scan_layers))
  models = ppo.PPOModels(policy=cfg, critic=cfg, reward=cfg)
  tx = ppo_trainer.make_optimizer(tuple(sorted(config.optim.to_dict().items())), 1000)

  policy = random_params(Transformer(cfg), 0)
  critic = random_params(ScalarModel(cfg), 1)
  frozen = ppo.Frozen(reference=jax.tree.map(jnp.copy, policy), reward=random_params(
      ScalarModel(cfg), 1), reward_gain=jnp.float32(1.0), reward_bias=jnp.float32(0.0))
  params = {"policy": policy, "critic": critic}
  state = ppo.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=ppo.init_opt_state(tx, params, hyper.optimizer),
                       ema=None, kl_coef=controller.initial(),
                       rng=jax.random.key_data(jax.random.key(0)))
  rng = np.random.default_rng(2)
  prompts = jnp.asarray(rng.integers(4, cfg.vocab_size, (args.prompts, args.prompt_len)),
                        jnp.int32)
  return types.SimpleNamespace(
      cfg=cfg, hyper=hyper, state=state, frozen=frozen, prompts=prompts,
      prompt_mask=jnp.ones_like(prompts),
      rollout_fn=make_rollout_fn(cfg, args.new_tokens, (), 0,
                                 ppo_trainer.sampling_from_config(config.sampling)),
      experience_fn=jax.jit(functools.partial(ppo.make_experience, models=models, hyper=hyper)),
      update_fn=jax.jit(functools.partial(ppo.ppo_update, models=models, hyper=hyper,
                                          controller=controller, tx=tx), donate_argnums=0))


def run_dtype(args, dtype: str) -> dict:
  w = build_workload(args, dtype)
  cfg, hyper, state, frozen = w.cfg, w.hyper, w.state, w.frozen
  prompts, prompt_mask = w.prompts, w.prompt_mask
  rollout_fn, experience_fn, update_fn = w.rollout_fn, w.experience_fn, w.update_fn

  # The peak is timed before and after the iterations and the higher one used: on a shared
  # machine a single reading can land in a busy moment and flatter the MFU.
  def peak():
    return common.jax_matmul_peak(dtype, args.matmul_n, args.matmul_repeats)["flops_per_s"]

  peaks = [peak()]
  phases = {"generate": [], "score": [], "update": []}
  cpu_phases = {k: [] for k in phases}
  first = {}
  # Resident memory after each phase, first iteration (compiles included) and last: where the
  # process's peak is set, beside what the state alone holds.
  memory = {"state": common.memory_gib()}
  for it in range(args.iterations + 1):
    key = jax.random.fold_in(state.key(), 0)
    t0, c0 = time.perf_counter(), time.process_time()
    ro = jax.block_until_ready(rollout_fn({"params": state.params["policy"]}, prompts,
                                          prompt_mask, key))
    t1, c1 = time.perf_counter(), time.process_time()
    at = "first" if it == 0 else "last"
    if it == 0:  # as the train loop does after a step's first call (core/host_memory.py)
      host_memory.release_freed_memory()
    memory[f"{at}_generate"] = common.memory_gib()
    exp, metrics = jax.block_until_ready(experience_fn(state.params, frozen, ro, state.kl_coef))
    t2, c2 = time.perf_counter(), time.process_time()
    if it == 0:
      host_memory.release_freed_memory()
    memory[f"{at}_score"] = common.memory_gib()
    if it == 0:  # compiled ahead of its first call, to read XLA's memory plan of the update
      update_fn = update_fn.lower(state, exp, None).compile()
      update_plan = executable_memory(update_fn)
      host_memory.release_freed_memory()
    state, stats = jax.block_until_ready(update_fn(state, exp, None))
    t3, c3 = time.perf_counter(), time.process_time()
    memory[f"{at}_update"] = common.memory_gib()
    split = {"generate": t1 - t0, "score": t2 - t1, "update": t3 - t2}
    cpu_split = {"generate": c1 - c0, "score": c2 - c1, "update": c3 - c2}
    if it == 0:  # compiles included
      first = split
      assert float(np.asarray(ro.answer_mask).sum()) == args.prompts * args.new_tokens
      continue
    for k, v in split.items():
      phases[k].append(v)
      cpu_phases[k].append(cpu_split[k])

  med = {k: statistics.median(v) for k, v in phases.items()}
  iteration = sum(med.values())
  flops = workload_flops(cfg, args.prompts, args.prompt_len, args.new_tokens, args.epochs,
                         hyper.recompute_old_logprobs)
  floor = matmul_floor(cfg, args, dtype) if args.floor else None
  peaks.append(peak())
  peak = max(peaks)
  cpu_med = {k: statistics.median(v) for k, v in cpu_phases.items()}
  return {
      "dtype": dtype,
      # The process's peak so far (Linux: KiB): this dtype's own when it runs first or alone.
      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
      "memory_gib_after_phase": memory,
      # XLA's plan of the update (core/compiled_memory.py): arguments + outputs - donated +
      # temporaries; the frozen models and the other phases' buffers are not in it.
      "update_plan": update_plan,
      "update_plan_gib": update_plan["peak_bytes"] / 2 ** 30,
      "optimizer": hyper.optimizer,
      "scan_layers": bool(args.scan_layers),
      "remat": bool(args.remat),
      "old_logprobs": "recompute" if hyper.recompute_old_logprobs else "sampler",
      "iteration_s": iteration,
      "episodes_per_s": args.prompts / iteration,
      "seconds": med,
      "fraction": {k: v / iteration for k, v in med.items()},
      "first_iteration_s_with_compile": first,
      "matmul_peak_flops_per_s": peak,
      "matmul_peak_readings": peaks,
      "model_flops": flops,
      "mfu": {k: flops[k] / med[k] / peak for k in med},
      "update_model_flops_per_s": flops["update"] / med["update"],
      "cpu_seconds": cpu_med,
      "cpu_iteration_s": sum(cpu_med.values()),
      "all_seconds": phases,
      "all_cpu_seconds": cpu_phases,
      **({"matmul_floor_s": floor["seconds"], "matmul_floor_flops": floor["flops"],
          "matmul_floor_iteration_s": sum(floor["seconds"].values())} if floor else {}),
  }


SIZES = ("prompts", "prompt_len", "new_tokens", "epochs", "minibatches")


def peer_figures(path: str, args=None) -> dict:
  """{"iteration_s", "cpu_iteration_s", "source", "by_dtype"} of TRL: float32 (the W1 workload)
  from the peer script's JSON when given (a measurement of this session), else DESIGN.md's
  quiet-machine figure; `by_dtype` holds every dtype the JSON measured."""
  if not path and args is not None and args.size != "w1":
    return {"iteration_s": float("nan"), "cpu_iteration_s": None, "by_dtype": {},
            "source": f"none for size {args.size}: pass --peer_json (trl_ppo.py --workload)"}
  if not path:
    return {"iteration_s": TRL_REFERENCE["iteration_s"], "cpu_iteration_s": None, "by_dtype": {},
            "source": "DESIGN.md (TRL 1.9.0 + torch 2.13, float32, same kind of 2-core CPU, "
                      "quiet); not measured here"}
  with open(path) as f:
    peer = json.load(f)
  by_dtype = {r["dtype"]: r for r in peer.get("results", [])}
  if peer.get("benchmark") != "trl_ppo" or "float32" not in by_dtype:
    raise ValueError(f"{path}: not a float32 result of benchmarks/peers/trl_ppo.py")
  theirs = {k: peer["workload"].get(k) for k in SIZES}
  ours = {k: getattr(args, k) for k in SIZES} if args is not None else theirs
  if theirs != ours:
    raise ValueError(f"{path}: TRL ran another workload {theirs}, this run is {ours}")
  v = peer["versions"]
  return {"iteration_s": by_dtype["float32"]["iteration_s"],
          "cpu_iteration_s": by_dtype["float32"]["cpu_iteration_s"],
          "by_dtype": {d: r["iteration_s"] for d, r in by_dtype.items()},
          "source": f"{path}: TRL {v['trl']} / torch {v['torch']}, {', '.join(by_dtype)}, "
                    f"measured {peer['date']} (load {peer['machine']['loadavg_1m_before_after']})"}


def main(argv=None):
  args = parse_args(argv)
  load_before = os.getloadavg()[0]
  peer = peer_figures(args.peer_json, args)
  results = []
  for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
    results.append(run_dtype(args, dtype))
    # What is measured is kept even if a later dtype fails or is killed.
    common.write_json({"benchmark": "ppo_iteration", "partial": True, "results": results},
                      args.json_out)
  for r in results:
    r["speedup_vs_trl"] = peer["iteration_s"] / r["iteration_s"]
    if peer["cpu_iteration_s"]:
      r["cpu_speedup_vs_trl"] = peer["cpu_iteration_s"] / r["cpu_iteration_s"]
    if r["dtype"] in peer["by_dtype"]:  # TRL at the same compute dtype (its bf16 autocast)
      r["speedup_vs_trl_same_dtype"] = peer["by_dtype"][r["dtype"]] / r["iteration_s"]
    if "matmul_floor_iteration_s" in r:  # the most any implementation could gain on TRL
      r["floor_speedup_bound_vs_trl"] = peer["iteration_s"] / r["matmul_floor_iteration_s"]
  out = {
      "benchmark": "ppo_iteration",
      "workload": {"size": args.size, "prompts": args.prompts, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "epochs": args.epochs,
                   "minibatches": args.minibatches, "early_stop": False},
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": {**common.machine_info(), "devices": [str(d) for d in jax.devices()],
                  "jax": jax.__version__,
                  "loadavg_1m_before_after": [load_before, os.getloadavg()[0]]},
      "trl": peer,
      "results": results,
  }
  common.emit(out, args.json_out)
  print()
  print(common.markdown_table(
      ["dtype", "log pi_old", "iteration s", "episodes/s", "generate s (%)", "score s (%)",
       "update s (%)", "update MFU", "update GFLOP/s", "matmul peak GFLOP/s", "iteration CPU-s",
       "peak RSS GiB", "update plan GiB",
       f"vs TRL float32 {peer['iteration_s']:.1f} s", "vs TRL same dtype",
       "matmuls alone s", "bound vs TRL float32"],
      [[r["dtype"], r["old_logprobs"], f"{r['iteration_s']:.2f}", f"{r['episodes_per_s']:.1f}",
        *(f"{r['seconds'][k]:.2f} ({100 * r['fraction'][k]:.0f}%)"
          for k in ("generate", "score", "update")),
        f"{100 * r['mfu']['update']:.0f}%", f"{r['update_model_flops_per_s'] / 1e9:.0f}",
        f"{r['matmul_peak_flops_per_s'] / 1e9:.0f}", f"{r['cpu_iteration_s']:.1f}",
        f"{r['peak_rss_gib']:.2f}", f"{r['update_plan_gib']:.2f}", f"{r['speedup_vs_trl']:.2f}x",
        f"{r['speedup_vs_trl_same_dtype']:.2f}x" if "speedup_vs_trl_same_dtype" in r else "-",
        f"{r['matmul_floor_iteration_s']:.2f}" if "matmul_floor_iteration_s" in r else "-",
        f"{r['floor_speedup_bound_vs_trl']:.2f}x" if "floor_speedup_bound_vs_trl" in r else "-"]
       for r in results]))
  print(f"\nTRL: {peer['source']}")


if __name__ == "__main__":
  main()
