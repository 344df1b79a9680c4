"""One PPO iteration with and without LoRA: seconds, phase split and memory (issue 18).

Workload W4 at the SmolLM2-135M shape (size "135m"; `--size gemma3_270m` or another pretrained
shape of models/pretrained.py takes that shape, with the 135m preset's hyperparameters, random
weights): 16 prompts of 64 tokens, 64 sampled tokens
each (no early stop), RM score, per-token KL, GAE, then 1 epoch x 2 minibatches; configs/ppo.py's
optimizer. Settings: full parameters, and LoRA rank 8 and 16 on every projection (alpha 16),
each at float32 and bfloat16 compute. With LoRA the state holds the adapters and the critic's
head only: the policy's base is the frozen reference and the critic's trunk the frozen reward
model's (rl/ppo.py `full_params`), so two full models are resident instead of four, and the
optimizer state is the adapters'. Params are drawn in numpy (values do not change the cost).

Each setting runs in its own subprocess, so its peak RSS (getrusage's ru_maxrss, read in the
child) is that setting's alone: one warm-up iteration (compiles included), then `--iterations`
timed ones, median seconds per phase. The layers are scanned (--scan_layers 1): the same
arithmetic, and a compile of minutes less than 30 unrolled layers on a shared 2-core CPU.
The experience and update steps are compiled ahead (`lower().compile()`) and those
executables run the iterations, so XLA's memory plan of each (`core/compiled_memory.py`)
costs no second compile. Every result is written to the JSON as soon as it is measured: a
later failure keeps the earlier ones.

Memory part, on abstract inputs (jax.ShapeDtypeStruct; nothing allocated), scan_layers=True so
the compile is quick, one subprocess per size and dtype with a time limit: at 135M, 1B
(Llama-3.2-1B's shape) and 7B (Llama-2-7B's), the per-device plan of the full and the LoRA
(rank `--mem_rank`) PPO steps, and of one full model's params-and-activations: the arguments
(params, one minibatch) plus temporaries of one policy forward+backward over one minibatch,
its gradients (an output) left out. A PPO iteration's plan is the larger of the update's peak
and the experience step's peak plus the optimizer state (resident, not an argument there); the
rollout (params plus a KV cache) is smaller than both and not compiled here.

With `--base_quant int8` the LoRA settings and plans hold their frozen bases in int8
(models/quant.py; the RM's too, as the trainer does): the full setting is unchanged.

A third plan, `lora_shared`, is LoRA PPO with an RM that was itself trained as LoRA on the
SFT policy: the RM and the critic are adapters and heads on the reference's trunk, one base in
memory for all four models (rl/trainer.py).

`--critic_trunks trained,frozen` also times (and plans, as `lora_shared_head`) the LoRA
settings with `ppo.critic_trunk="frozen"`: the critic a value head on the RM's frozen trunk,
so scoring runs two trunk passes instead of three and the update none for the critic
(rl/head_critic.py). The full setting keeps its trained critic (TRL's layout).

Ratios (the issue's goals): LoRA PPO's plan over one full model's params-and-activations
(<= 1.4x), and the full-parameter iteration's seconds over the LoRA one's (>= 1.5x).

  XLA_FLAGS= .venv/bin/python benchmarks/lora_ppo.py [--ranks 0,8,16] [--dtypes ...]
      [--mem_sizes 135m,1b,7b] [--json_out FILE]

Prints one JSON object, then Markdown tables. Timings are never asserted.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from rlhf_jax.config import util as config_util  # noqa: E402
from rlhf_jax.core.compiled_memory import compiled_memory, executable_memory  # noqa: E402
from rlhf_jax.infer.rollout import Rollout, make_rollout_fn  # noqa: E402
from rlhf_jax.models import ScalarModel, Transformer, lora, pretrained, quant  # noqa: E402
from rlhf_jax.rl import ppo  # noqa: E402
from rlhf_jax.rl import trainer as ppo_trainer  # noqa: E402

GIB = 2.0 ** 30


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--size", default="135m")
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--epochs", type=int, default=1)
  p.add_argument("--minibatches", type=int, default=2)
  p.add_argument("--ranks", default="0,8,16", help="LoRA ranks; 0 = full parameters")
  p.add_argument("--alpha", type=float, default=16.0)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--iterations", type=int, default=2, help="timed iterations (after 1 warm-up)")
  p.add_argument("--mem_sizes", default="135m,1b,7b", help="'' skips the memory part")
  p.add_argument("--mem_dtypes", default="bfloat16,float32")
  p.add_argument("--mem_rank", type=int, default=16)
  p.add_argument("--mem_timeout", type=int, default=240,
                 help="seconds one size's compiles may take before it is reported as too slow")
  p.add_argument("--scan_layers", type=int, default=1,
                 help="1: the timed models scan their layers (30 unrolled layers take minutes to "
                      "compile on a shared 2-core CPU; the step's arithmetic is the same)")
  p.add_argument("--remat", type=int, default=0,
                 help="1: every model, and the one-model reference, rematerialises each layer "
                      "in the backward (model.remat)")
  p.add_argument("--optimizer", default="joint", choices=["joint", "per_model"],
                 help="ppo.optimizer: one optimizer over policy and critic, or one per model "
                      "(the policy's update before the critic's)")
  p.add_argument("--memory_after", type=int, default=2,
                 help="the memory part runs after this many timed settings (the first dtype's "
                      "full and largest-rank runs give the speed ratio first)")
  p.add_argument("--critic_trunks", default="trained",
                 help="ppo.critic_trunk of the LoRA settings, one setting each: trained "
                      "(adapters and head) and/or frozen (a head on the RM's trunk)")
  p.add_argument("--base_quant", default="", choices=["", "int8"],
                 help="the LoRA settings' frozen bases in int8 (models/quant.py)")
  p.add_argument("--setting_timeout", type=int, default=1800)
  p.add_argument("--subprocess", type=int, default=1,
                 help="0: every setting in this process (tests; RSS is then cumulative)")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # 'time:R:D' or 'mem:S:D'
  p.add_argument("--child_out", default="", help=argparse.SUPPRESS)
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


# ------------------------------------------------------------------------------ the models


@dataclasses.dataclass(frozen=True)
class Parts:
  """What one setting's steps are built from (static)."""
  models: ppo.PPOModels
  hyper: ppo.PPOHyper
  controller: object
  tx: object
  sampling: object


def make_parts(args, size: str, dtype: str, rank: int, scan: bool, shared: bool = False,
               critic_trunk: str = "trained") -> Parts:
  """configs/ppo.py's hyperparameters and optimizer for the W4 workload, models of `size`.
  shared: the RM is LoRA on the SFT policy (rank `rank` too), kept as adapters on the
  reference's trunk, and the critic starts as it (rl/trainer.py): one base for four models."""
  # A pretrained shape (gemma3_270m, smollm2_135m) takes the 135m preset's hyperparameters.
  preset = "135m" if size in pretrained.SHAPES else size
  config = config_util.load_config(f"configs/ppo.py:size={preset}")
  with config.unlocked():
    config.model.dtype = dtype
    config.ppo.epochs, config.ppo.minibatches = args.epochs, args.minibatches
    config.ppo.penalize_missing_eos = False  # no stop ids: every answer runs the full budget
    config.kl.adaptive = False
    config.ppo.optimizer = args.optimizer
    config.ppo.critic_trunk = critic_trunk
  base = common.shape_config(size, dtype=dtype, scan_layers=scan, remat=bool(args.remat))
  quant_base = args.base_quant if rank else ""
  adapted = (dataclasses.replace(base, lora_rank=rank, lora_alpha=args.alpha,
                                 lora_base_quant=quant_base) if rank else base)
  # As rl/trainer.py: the critic's trunk is the frozen RM's, so an int8 base makes both int8.
  reward = adapted if shared else dataclasses.replace(base, lora_base_quant=quant_base)
  return Parts(models=ppo.PPOModels(policy=adapted, critic=adapted, reward=reward),
               hyper=ppo_trainer.hyper_from_config(config),
               controller=ppo_trainer.controller_from_config(config),
               tx=ppo_trainer.make_optimizer(tuple(sorted(config.optim.to_dict().items())), 1000),
               sampling=ppo_trainer.sampling_from_config(config.sampling))


def abstract_models(models: ppo.PPOModels, critic_trunk: str = "trained"
                    ) -> tuple[dict, ppo.Frozen]:
  """(trained params {'policy', 'critic'}, Frozen) as ShapeDtypeStruct trees, as the trainer
  lays them out (rl/weights.py `create_models`): with LoRA the adapters (and the critic's head)
  are trained and the reference is the policy's base; a frozen critic trunk leaves the head."""
  def init():
    tokens = jnp.zeros((1, 8), jnp.int32)
    inputs = (tokens, tokens, jnp.ones_like(tokens))
    policy = Transformer(models.policy).init(jax.random.key(0), *inputs)["params"]
    critic = ScalarModel(models.critic).init(jax.random.key(1), *inputs)["params"]
    reward = ScalarModel(models.reward).init(jax.random.key(1), *inputs)["params"]
    return nn.unbox((policy, critic, reward))
  policy, critic, reward = jax.eval_shape(init)
  if models.policy.lora_rank:
    (policy, base), (critic, _) = lora.split(policy), lora.split(critic)
  else:
    base = policy
  if models.reward.lora_rank:  # a shared base: the RM is adapters and a head
    reward, _ = lora.split(reward)
  if critic_trunk == "frozen":
    critic = {"head": critic["head"]}
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  return {"policy": policy, "critic": critic}, ppo.Frozen(base, reward, scalar, scalar)


def draw(tree, seed: int):
  """Arrays of the abstract tree's shapes drawn in numpy: norms' scales 1, biases and LoRA B 0,
  other weights N(0, 1 / fan_in)."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    name = jax.tree_util.keystr(path)
    if not leaf.shape or "scale" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    if "bias" in name or "lora_b" in name:
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = 1 if "embedding" in name else leaf.shape[0]
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in), leaf.dtype)
  return jax.tree_util.tree_map_with_path(one, tree)


def draw_base(tree, seed: int, config):
  """`draw`, for a frozen base that may be int8: drawn in float32, then quantised."""
  if not quant.is_quantized(tree):
    return draw(tree, seed)
  return quant.quantize_tree(draw(quant.float_like(tree), seed), config)


def make_state(params, parts: Parts) -> ppo.PPOState:
  return ppo.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=ppo.init_opt_state(parts.tx, params, parts.hyper.optimizer),
                      ema=None,
                      kl_coef=jnp.asarray(parts.controller.initial(), jnp.float32),
                      rng=jax.random.key_data(jax.random.key(0)))


def abstract_rollout(batch: int, prompt_len: int, new_tokens: int) -> Rollout:
  s = jax.ShapeDtypeStruct
  seq = s((batch, prompt_len + new_tokens), jnp.int32)
  answer = s((batch, new_tokens), jnp.float32)
  return Rollout(seq, seq, seq, answer, answer, s((batch,), jnp.bool_))


def step_fns(parts: Parts):
  """(experience, update): jitted with keep_unused, so every resident model is an argument of
  both and counts in their memory plans (the full update does not read the frozen models)."""
  experience = jax.jit(functools.partial(ppo.make_experience, models=parts.models,
                                         hyper=parts.hyper), keep_unused=True)

  def update(state, experience, frozen):
    return ppo.ppo_update(state, experience, None, models=parts.models, hyper=parts.hyper,
                          controller=parts.controller, tx=parts.tx, frozen=frozen)
  return experience, jax.jit(update, donate_argnums=0, keep_unused=True)


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def sizes_of(params, frozen, opt_state) -> dict:
  count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  return {"trained_params": count, "trained_bytes": nbytes(params),
          "frozen_bytes": nbytes(frozen), "opt_state_bytes": nbytes(opt_state)}


def iteration_plan(experience: dict, update: dict, opt_state_bytes: int) -> int:
  """The larger of the update's peak and the experience step's peak plus the optimizer state
  (resident through the score phase, but not one of its arguments)."""
  return max(update["peak_bytes"], experience["peak_bytes"] + opt_state_bytes)


def timed_iterations(args, parts: Parts, state, frozen, prompts, mask) -> tuple:
  """(per-phase seconds of every iteration, warm-up split, experience and update executables'
  memory plans). The warm-up compiles the two steps ahead of time and reads their plans."""
  rollout_fn = make_rollout_fn(parts.models.policy, args.new_tokens, (), 0, parts.sampling)
  experience_fn, update_fn = step_fns(parts)
  adapted = bool(parts.models.policy.lora_rank)
  phases, first, memory = {"generate": [], "score": [], "update": []}, {}, {}
  for it in range(args.iterations + 1):
    key = jax.random.fold_in(state.key(), 0)
    policy = (lora.merge(state.params["policy"], frozen.reference) if adapted
              else state.params["policy"])
    t0 = time.perf_counter()
    ro = jax.block_until_ready(rollout_fn({"params": policy}, prompts, mask, key))
    t1 = time.perf_counter()
    exp_args = (state.params, frozen, ro, state.kl_coef)
    if it == 0:
      experience_fn = experience_fn.lower(*exp_args).compile()
      memory["experience"] = executable_memory(experience_fn)
    exp, _ = jax.block_until_ready(experience_fn(*exp_args))
    t2 = time.perf_counter()
    if it == 0:
      update_fn = update_fn.lower(state, exp, frozen).compile()
      memory["update"] = executable_memory(update_fn)
      opt_bytes = nbytes(state.opt_state)
    state, _ = jax.block_until_ready(update_fn(state, exp, frozen))
    t3 = time.perf_counter()
    split = {"generate": t1 - t0, "score": t2 - t1, "update": t3 - t2}
    if it == 0:
      first = split
      continue
    for k, v in split.items():
      phases[k].append(v)
  memory["iteration_plan_bytes"] = iteration_plan(memory["experience"], memory["update"],
                                                  opt_bytes)
  return phases, first, memory


def setting_name(rank: int, critic_trunk: str) -> str:
  return "full" if not rank else f"lora{rank}" + ("+head" if critic_trunk == "frozen" else "")


def run_timing(args, rank: int, dtype: str, critic_trunk: str = "trained") -> dict:
  """One setting: `iterations` timed PPO iterations after a warm-up; peak RSS at the end."""
  critic_trunk = critic_trunk if rank else "trained"
  parts = make_parts(args, args.size, dtype, rank, scan=bool(args.scan_layers),
                     critic_trunk=critic_trunk)
  params_abs, frozen_abs = abstract_models(parts.models, critic_trunk)
  params = {"policy": draw(params_abs["policy"], 0), "critic": draw(params_abs["critic"], 1)}
  # The full policy's buffers are donated, so its reference is a separate draw (equal values).
  frozen = ppo.Frozen(reference=draw_base(frozen_abs.reference, 0, parts.models.policy),
                      reward=draw_base(frozen_abs.reward, 1, parts.models.reward),
                      reward_gain=jnp.float32(1.0), reward_bias=jnp.float32(0.0))
  state = make_state(params, parts)
  info = sizes_of(params, frozen, state.opt_state)
  rng = np.random.default_rng(2)
  vocab = parts.models.policy.vocab_size
  prompts = jnp.asarray(rng.integers(4, vocab, (args.prompts, args.prompt_len)), jnp.int32)
  phases, first, memory = timed_iterations(args, parts, state, frozen, prompts,
                                           jnp.ones_like(prompts))
  med = {k: statistics.median(v) for k, v in phases.items()}
  iteration = sum(med.values())
  return {"setting": setting_name(rank, critic_trunk), "rank": rank, "dtype": dtype,
          "critic_trunk": critic_trunk,
          "old_logprobs": "recompute" if parts.hyper.recompute_old_logprobs else "sampler",
          "iteration_s": iteration, "seconds": med,
          "fraction": {k: v / iteration for k, v in med.items()},
          "first_iteration_s_with_compile": first, "all_seconds": phases,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
          "compiled_memory": memory, **info}


# ------------------------------------------------------------------------------ memory part


def one_model_memory(cfg, args, temperature: float) -> dict:
  """One full policy's params-and-activations: arguments + temporaries of its forward+backward
  over one minibatch (the gradients, an output, are not counted)."""
  params, _ = abstract_models(ppo.PPOModels(cfg, cfg, cfg))

  def loss(p, rollout):
    return -jnp.sum(ppo.answer_logprobs(p, rollout, model_config=cfg, temperature=temperature))
  rows = args.prompts // args.minibatches
  mem = compiled_memory(jax.grad(loss), params["policy"],
                        abstract_rollout(rows, args.prompt_len, args.new_tokens))
  mem["params_and_activations_bytes"] = mem["argument_bytes"] + mem["temp_bytes"]
  return mem


def run_memory(args, size: str, dtype: str) -> dict:
  """Per-device plans of the full and the LoRA PPO steps and of one full model, abstract."""
  out = {"size": size, "dtype": dtype, "rank": args.mem_rank}
  for name, rank, shared, trunk in plans(args):
    t0 = time.perf_counter()
    parts = make_parts(args, size, dtype, rank, scan=True, shared=shared, critic_trunk=trunk)
    params, frozen = abstract_models(parts.models, trunk)
    state = jax.eval_shape(functools.partial(make_state, parts=parts), params)
    experience_fn, update_fn = step_fns(parts)
    exp_args = (state.params, frozen, abstract_rollout(args.prompts, args.prompt_len,
                                                       args.new_tokens), state.kl_coef)
    exp = jax.eval_shape(experience_fn, *exp_args)[0]
    mem = {"experience": compiled_memory(experience_fn, *exp_args),
           "update": compiled_memory(update_fn, state, exp, frozen)}
    mem["iteration_plan_bytes"] = iteration_plan(mem["experience"], mem["update"],
                                                 nbytes(state.opt_state))
    out[name] = {**mem, **sizes_of(params, frozen, state.opt_state),
                 "compile_s": time.perf_counter() - t0}
  cfg = common.shape_config(size, dtype=dtype, scan_layers=True, remat=bool(args.remat))
  out["one_model"] = one_model_memory(cfg, args, parts.hyper.temperature)
  one = out["one_model"]["params_and_activations_bytes"]
  out["ratio_to_one_model"] = {k: out[k]["iteration_plan_bytes"] / one
                               for k, *_ in plans(args)}
  return out


def plans(args) -> list[tuple]:
  """(name, rank, shared base, critic trunk) of each memory plan."""
  out = [("full", 0, False, "trained"), ("lora", args.mem_rank, False, "trained"),
         ("lora_shared", args.mem_rank, True, "trained")]
  if "frozen" in args.critic_trunks:
    out.append(("lora_shared_head", args.mem_rank, True, "frozen"))
  return out


# ------------------------------------------------------------------------------ the driver


def run_child(args, spec: str) -> dict:
  kind, a, dtype, *trunk = spec.split(":")
  return (run_timing(args, int(a), dtype, *trunk) if kind == "time"
          else run_memory(args, a, dtype))


def run_spec(args, argv, spec: str, timeout: int) -> dict:
  """The result of one setting, from a subprocess (or in process with --subprocess 0); a
  failure or a timeout becomes {"error": ...}."""
  if not args.subprocess:
    return run_child(args, spec)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", spec, "--child_out", path]
    start = time.perf_counter()
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"spec": spec, "error": f"timed out after {timeout} s"}
    if proc.returncode or not os.path.exists(path):
      return {"spec": spec, "error": (proc.stderr or proc.stdout)[-3000:]}
    with open(path) as f:
      result = json.load(f)
    result["subprocess_s"] = time.perf_counter() - start
    return result


def specs(args) -> list[str]:
  """The order of the runs: per dtype full, then the ranks largest first; the memory part
  after `memory_after` of them."""
  words = lambda s: [w.strip() for w in s.split(",") if w.strip()]  # noqa: E731
  ranks = sorted({int(r) for r in words(args.ranks)}, key=lambda r: (r != 0, -r))
  timed = [f"time:{r}:{d}" + (f":{c}" if r else "") for d in words(args.dtypes) for r in ranks
           for c in (words(args.critic_trunks) if r else ["trained"])]
  memory = [f"mem:{s}:{d}" for d in words(args.mem_dtypes) for s in words(args.mem_sizes)]
  return timed[:args.memory_after] + memory + timed[args.memory_after:]


def ratios(out: dict) -> dict:
  """Full over LoRA iteration seconds per dtype and rank; LoRA's memory ratio per size."""
  timed = {(r["dtype"], r["setting"]): r for r in out["results"] if "iteration_s" in r}
  speed = {f"{d}/{name}": timed[(d, "full")]["iteration_s"] / r["iteration_s"]
           for (d, name), r in timed.items() if name != "full" and (d, "full") in timed}
  memory = {f"{m['size']}/{m['dtype']}/{kind}{m['rank']}": ratio
            for m in out["memory"] if "ratio_to_one_model" in m
            for kind, ratio in m["ratio_to_one_model"].items() if kind != "full"}
  return {"full_over_lora_iteration_s": speed, "lora_plan_over_one_model": memory,
          "goals": {"memory": "<= 1.4", "speed": ">= 1.5"}}


def gib(x: float) -> str:
  return f"{x / GIB:.2f}"


def tables(out: dict) -> str:
  timed = [r for r in out["results"] if "iteration_s" in r]
  speed = out["ratios"]["full_over_lora_iteration_s"]
  first = common.markdown_table(
      ["setting", "dtype", "iteration s", "generate s (%)", "score s (%)", "update s (%)",
       "full / this", "peak RSS GiB", "update plan GiB", "iteration plan GiB",
       "trained params", "optimizer state GiB"],
      [[r["setting"], r["dtype"], f"{r['iteration_s']:.2f}",
        *(f"{r['seconds'][k]:.2f} ({100 * r['fraction'][k]:.0f}%)"
          for k in ("generate", "score", "update")),
        f"{speed[key]:.2f}x" if (key := f"{r['dtype']}/{r['setting']}") in speed else "-",
        f"{r['peak_rss_gib']:.2f}", gib(r["compiled_memory"]["update"]["peak_bytes"]),
        gib(r["compiled_memory"]["iteration_plan_bytes"]), f"{r['trained_params']:,}",
        gib(r["opt_state_bytes"])] for r in timed])
  mem = [m for m in out["memory"] if "one_model" in m]
  kinds = [k for k in ("full", "lora", "lora_shared", "lora_shared_head")
           if any(k in m for m in mem)]
  second = common.markdown_table(
      ["size", "dtype", *(f"{k} plan GiB" for k in kinds), "one model params+act GiB",
       *(f"{k} / one model" + (" (goal <= 1.4)" if k != "full" else "") for k in kinds)],
      [[m["size"], m["dtype"], *(gib(m[k]["iteration_plan_bytes"]) if k in m else "-"
                                 for k in kinds),
        gib(m["one_model"]["params_and_activations_bytes"]),
        *(f"{m['ratio_to_one_model'][k]:.2f}x" if k in m else "-" for k in kinds)]
       for m in mem])
  failed = [f"- {r.get('spec')}: {(r['error'].strip().splitlines() or [''])[-1]}"
            for r in out["results"] + out["memory"] if "error" in r]
  return "\n\n".join([first, second] + (["failed or skipped:\n" + "\n".join(failed)]
                                         if failed else []))


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.child:
    result = run_child(args, args.child)
    with open(args.child_out, "w") as f:
      json.dump(result, f)
    return
  load_before = os.getloadavg()
  out = {"benchmark": "lora_ppo",
         "workload": {k: getattr(args, k) for k in ("size", "prompts", "prompt_len",
                                                    "new_tokens", "epochs", "minibatches",
                                                    "iterations", "alpha", "mem_rank",
                                                    "scan_layers", "base_quant")},
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine": {**common.machine_info(), "jax": jax.__version__,
                     "loadavg_before": load_before},
         "results": [], "memory": []}
  for spec in specs(args):
    timing = spec.startswith("time:")
    result = run_spec(args, argv, spec, args.setting_timeout if timing else args.mem_timeout)
    out["results" if timing else "memory"].append(result)
    out["ratios"] = ratios(out)
    common.write_json(out, args.json_out)
  out["ratios"] = ratios(out)
  out["machine"]["loadavg_after"] = os.getloadavg()
  common.emit(out, args.json_out)
  print()
  print(tables(out))


if __name__ == "__main__":
  main()
