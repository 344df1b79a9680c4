"""PPO's setup: four models in, a policy out. The step is rl/iteration.py (host side) over
rl/ppo.py (the pure, jitted numerics); the loop is the one every trainer runs (train/loop.py).

Models, all on the same mesh:
  policy      trained; from the SFT checkpoint (`config.sft_dir`)
  reference   frozen; the same SFT params (a separate copy: the policy's buffers are donated)
  critic      trained; a ScalarModel initialised from the reward model, trunk and head, with
              the RM's normalisation folded into its head so its first values are in reward units
              (ppo.critic_trunk="frozen": the head alone, reading the frozen RM's trunk)
  reward      frozen; the RM checkpoint (`config.rm_dir`) and its normalization.json

Per iteration (rl/iteration.py): prompts -> rollout (jit) -> experience (jit) -> NaN check ->
update (jit, state donated). Device values reach the host once per iteration.
Every problem with the inputs -- β < 0, clip ranges outside (0, 1), minibatches that do not
divide the batch, a checkpoint whose vocabulary is not the tokenizer's -- is an error raised
before anything is compiled.

Checkpoints: `params` holds the policy alone (a later stage initialises from it exactly as
from SFT); `train` holds the critic, optimizer state, EMA, β, step and rng; `data` the prompt
stream's position. The same command in the same workdir resumes mid-run.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import flax.linen as nn
import jax
import numpy as np

from rlhf_jax.config import util as config_util
from rlhf_jax.core import optim, run_folder, sharding
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.eval import ppo_periodic as evaluation
from rlhf_jax.infer.rollout import make_rollout_fn
from rlhf_jax.infer.sampling import SamplingParams
from rlhf_jax.models import ModelConfig, lora
from rlhf_jax.models.transformer import NUMERICS_FIELDS
from rlhf_jax.rl import iteration, kl, ppo
from rlhf_jax.rl.iteration import Iteration, NonFiniteRewardError  # noqa: F401 (re-exported)
from rlhf_jax.rl.weights import (check_filled, create_models, load_frozen,  # noqa: F401
                                 load_trainable, loaded_parts)
from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
from rlhf_jax.train import inputs as inputs_lib
from rlhf_jax.train.loop import Composite, Evaluation, resume, run_train_loop
from rlhf_jax.infer.rm_scores import read_normalization
from rlhf_jax.data import builders, pipeline

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The config, checked before anything runs.


def hyper_from_config(config) -> ppo.PPOHyper:
  p = config.ppo
  old = p.old_logprobs
  if old not in ("auto", "sampler", "recompute"):
    raise ValueError(f"ppo.old_logprobs must be 'auto', 'sampler' or 'recompute', got {old!r}")
  recompute = old == "recompute" or (old == "auto" and config.model.dtype != "float32")
  return ppo.PPOHyper(
      epochs=p.epochs, minibatches=p.minibatches, clip_eps=p.clip_eps, value_clip=p.value_clip,
      vf_coef=p.vf_coef, ent_coef=p.ent_coef, gamma=p.gamma, lam=p.lam,
      temperature=config.sampling.temperature, kl_estimator=p.kl_estimator,
      whiten_rewards=p.whiten_rewards, optimizer=p.optimizer,
      critic_trunk=p.critic_trunk, loss_mean=p.loss_mean,
      missing_eos_penalty=p.missing_eos_penalty if p.penalize_missing_eos else None,
      ptx_coef=config.ptx.coef, ema_decay=p.ema_decay, recompute_old_logprobs=recompute)


def controller_from_config(config, langs: tuple = ()) -> kl.KLController:
  """The KL controller; with `kl.coef_by_lang` ('zh:0.1'), one β per language of `langs` (the
  run's, in order), kl.coef for those it does not name."""
  by_lang = config_util.parse_coef_by_lang(config.kl.get("coef_by_lang", ""), langs)
  lang_coefs = tuple(by_lang.get(lang, config.kl.coef) for lang in langs) if by_lang else ()
  return kl.KLController(init_coef=config.kl.coef, adaptive=config.kl.adaptive,
                         target=config.kl.target, horizon=config.kl.horizon,
                         lang_coefs=lang_coefs)


def sampling_from_config(section) -> SamplingParams:
  return SamplingParams(temperature=section.temperature, top_k=section.get("top_k", 0),
                        top_p=section.top_p)


# ---------------------------------------------------------------------------------------------
# Where the models come from.


def read_run_model(run: str, kind: str, numerics) -> ModelConfig:
  """The ModelConfig a run's record names (core/run_folder.py), with this run's compute dtype
  and remat: the shape is the checkpoint's, the precision this run's."""
  record_kind = {"policy": "policy", "reward model": "scalar"}[kind]
  found = run_folder.read_record(run)["kind"]
  if found != record_kind:
    raise ValueError(f"{run_folder.root(run)} does not hold a {kind} checkpoint (its record "
                     f"says {found})")
  # A LoRA run opens folded (run_folder.restore_params): its model is the base's shape.
  return lora.folded_config(run_folder.model_config(run, **{k: numerics[k]
                                                            for k in NUMERICS_FIELDS}))


def check_vocab(what: str, where: str, vocab: int, tokenizer) -> None:
  if vocab != tokenizer.vocab_size:
    raise ValueError(
        f"the {what} checkpoint {where} has a vocabulary of {vocab} tokens but the policy's "
        f"tokenizer {tokenizer.path} has {tokenizer.vocab_size}: every model of a PPO run must "
        "use the same tokenizer (set tokenizer.path to the one the SFT and RM runs used)")


def load_tokenizer(config, workdir: str):
  """config.tokenizer.path, else the SFT run's tokenizer, else one trained into the workdir."""
  if config.tokenizer.path:
    return load_any_tokenizer(config.tokenizer.path)
  if config.sft_dir:
    return run_folder.tokenizer(config.sft_dir)
  tokenizer, _ = inputs_lib.load_tokenizer(config, workdir)
  return tokenizer


def resolve_models(config, tokenizer) -> tuple[ppo.PPOModels, dict]:
  """Shapes of the four models and where their params come from; all checks, no compiling."""
  if config.sft_dir:
    sft_ckpt = run_folder.root(config.sft_dir)
    policy = read_run_model(sft_ckpt, "policy", config.model)
    check_vocab("SFT", sft_ckpt, policy.vocab_size, tokenizer)
  else:
    log.warning("no sft_dir: the policy and the reference start from random params")
    sft_ckpt = None
    fields = {k: v for k, v in config.model.to_dict().items() if k != "size"}
    policy = ModelConfig.from_config({**fields, "vocab_size": tokenizer.vocab_size})

  gain, bias = 1.0, 0.0
  if config.rm_dir:
    rm_ckpt = run_folder.root(config.rm_dir)
    reward = read_run_model(rm_ckpt, "reward model", config.model)
    check_vocab("reward model", rm_ckpt, reward.vocab_size, tokenizer)
    norm = read_normalization(config.rm_dir)  # PPO needs the RM's scale pinned
    gain, bias = float(norm["gain"]), float(norm["bias"])
  else:
    log.warning("no rm_dir: the reward model and the critic start from random params")
    rm_ckpt = None
    reward = policy
  # config.lora adapts the policy and the critic; the reference and the RM stay their bases.
  adapters = lora.model_fields(config.get("lora"))
  if (config.get("lora") or {}).get("tokens_start"):
    raise ValueError("lora.tokens_start: set it in SFT (PPO's policy starts from SFT's rows)")
  if adapters.get("lora_rank") and not sft_ckpt:
    raise ValueError("lora.rank > 0 needs sft_dir: the frozen policy the adapters train on")
  sources = {"sft": sft_ckpt, "rm": rm_ckpt, "gain": gain, "bias": bias, "shared": False}
  quant = adapters.get("lora_base_quant", "")
  if adapters.get("lora_rank") and rm_ckpt and run_folder.is_trunk_of(rm_ckpt, sft_ckpt, quant):
    # One base for all four models: the RM stays its adapters and head on the SFT trunk, and
    # the critic starts as the RM (its adapters copied, in the RM's own LoRA settings).
    rm_adapters = run_folder.model_config(rm_ckpt, **{k: config.model[k]
                                                      for k in NUMERICS_FIELDS})
    models = ppo.PPOModels(policy=dataclasses.replace(policy, **adapters), critic=rm_adapters,
                           reward=rm_adapters)
    return models, {**sources, "shared": True}
  # The critic's trunk is the frozen RM's (load_trainable): an int8 base makes both int8.
  models = ppo.PPOModels(policy=dataclasses.replace(policy, **adapters),
                         critic=dataclasses.replace(reward, **adapters),
                         reward=dataclasses.replace(reward, lora_base_quant=quant))
  return models, sources


# ---------------------------------------------------------------------------------------------
# Sharded state.


@functools.lru_cache(maxsize=8)
def make_optimizer(optim_items: tuple, total_updates: int):
  """optim.make_optimizer, one object per settings, so the jitted functions built on it can
  be cached too: several runs in one process (sweeps, notebooks, tests) compile once."""
  import ml_collections
  return optim.make_optimizer(ml_collections.ConfigDict(dict(optim_items)), total_updates)


# ---------------------------------------------------------------------------------------------
# Inputs.


def make_prompt_stream(config, tokenizer, langs):
  data_dir = builders.resolve_data_dir(config.data.data_dir or None)
  source = pipeline.load_source(config.data.name, config.data.split, data_dir)
  return prompts_lib.PromptStream(
      prompts_lib.read_records(source), tokenizer, langs=langs,
      batch_size=config.data.batch_size, max_prompt_len=config.data.max_prompt_len,
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())


def make_ptx_iterator(config, tokenizer):
  """Pretraining batches [minibatches · rows, T] for PPO-ptx, or None when it is off."""
  if not config.ptx.coef:
    return None
  data_dir = builders.resolve_data_dir(config.data.data_dir or None)
  return pipeline.make_lm_iterator(
      config.ptx.data, config.ptx.split, data_dir=data_dir,
      batch_size=config.ptx.rows * config.ppo.minibatches, seq_len=config.ptx.seq_len,
      tokenize_fn=inputs_lib.tokenize_fn_for(tokenizer, config.ptx.seq_len), seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())


@functools.lru_cache(maxsize=32)
def cached_jit(fn, **static):
  """jit(partial(fn, **static)), one per (fn, static arguments): runs in one process share it."""
  return jax.jit(functools.partial(fn, **static))


def make_evaluator(config, tokenizer, langs, models, workdir, mesh, rules):
  data_dir = builders.resolve_data_dir(config.data.data_dir or None)
  records = prompts_lib.read_records(
      pipeline.load_source(config.data.name, config.eval.split, data_dir))
  prompts = {lang: prompts_lib.eval_prompts(records, tokenizer, lang, config.eval.n_prompts,
                                            config.data.max_prompt_len) for lang in langs}
  eval_sampling = sampling_from_config(config.eval)
  return evaluation.Evaluator(
      tokenizer, prompts, max_prompt_len=config.data.max_prompt_len,
      rollout_fn=make_rollout_fn(models.policy, config.eval.max_new_tokens,
                                 tuple(tokenizer.stop_ids()), tokenizer.pad_id, eval_sampling),
      proxy_fn=cached_jit(ppo.reward_model_scores, model_config=models.reward),
      ref_logprobs_fn=cached_jit(ppo.answer_logprobs,
                                 model_config=lora.base_config(models.policy),
                                 temperature=eval_sampling.temperature),
      samples_dir=os.path.join(workdir, "samples"), seed=config.seed + 1,
      place=functools.partial(place_rows, mesh=mesh, rules=rules))


def place_rows(x: np.ndarray, mesh, rules) -> jax.Array:
  """The same host rows on every process -> a global array split like a batch (replicated if
  the mesh does not divide them)."""
  shard = sharding.batch_sharding(mesh, rules, x.ndim)
  if x.shape[0] % sharding.batch_shards(mesh, rules):
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.make_array_from_callback(x.shape, shard, lambda index: x[index])


# ---------------------------------------------------------------------------------------------
# The loop.


def split_ptx(batch, minibatches: int):
  """[M · rows, T] -> [M, rows, T], every M-th row to a minibatch (each device keeps its own)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // minibatches, minibatches,
                                          *x.shape[1:]).swapaxes(0, 1), batch)


@functools.lru_cache(maxsize=4)
def _update_fn(models, hyper, controller, tx, shardings_key):
  treedef, leaves = shardings_key
  state_shardings = jax.tree.unflatten(treedef, leaves)

  def update(state, frozen, experience, ptx):
    ptx = split_ptx(ptx, hyper.minibatches) if ptx is not None else None
    return ppo.ppo_update(state, experience, ptx, models=models, hyper=hyper,
                          controller=controller, tx=tx, frozen=frozen)

  return jax.jit(update, in_shardings=(state_shardings, None, None, None),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def make_step_fns(models, hyper, controller, tx, tokenizer, config, state_shardings):
  """The three jitted phases (cached by their static settings). β is an argument, an array:
  changing it never retraces. The update donates the state."""
  rollout_fn = make_rollout_fn(models.policy, config.sampling.max_new_tokens,
                               tuple(tokenizer.stop_ids()), tokenizer.pad_id,
                               sampling_from_config(config.sampling))
  experience_fn = cached_jit(ppo.make_experience, models=models, hyper=hyper)
  leaves, treedef = jax.tree.flatten(state_shardings)
  update_fn = _update_fn(models, hyper, controller, tx, (treedef, tuple(leaves)))
  return rollout_fn, experience_fn, update_fn


def check_config(config, langs, mesh, rules) -> ppo.PPOHyper:
  """PPO's hyperparameters; every problem with them an error before any work."""
  hyper = hyper_from_config(config)
  hyper.check_batch(config.data.batch_size, sharding.batch_shards(mesh, rules))
  if config.data.batch_size % len(langs):
    raise ValueError(f"data.batch_size={config.data.batch_size} must split evenly over the "
                     f"languages {langs}")
  return hyper


def check_lengths(config, models: ppo.PPOModels) -> None:
  need = config.data.max_prompt_len + max(config.sampling.max_new_tokens,
                                          config.eval.max_new_tokens)
  if need > models.policy.max_len:
    raise ValueError(f"data.max_prompt_len + max_new_tokens = {need} exceeds the policy's "
                     f"max_len={models.policy.max_len}")


def make_evaluations(config, tokenizer, langs, models, frozen, workdir, mesh, rules):
  """PPO's periodic held-out evaluation (gold score, win rate against SFT), timed."""
  if not config.eval.n_prompts:
    return []
  evaluator = make_evaluator(config, tokenizer, langs, models, workdir, mesh, rules)

  def evaluate(step, policy):
    t0 = time.perf_counter()
    sft = frozen.reference
    if models.policy.lora_rank:  # the adapters on their base; SFT is the base, adapters off
      policy = lora.merge(policy, frozen.reference)
      sft = lora.zero_adapters(policy)
    metrics = evaluator(step, policy, frozen, sft_params=sft)
    return {**metrics, "time/eval": time.perf_counter() - t0}

  return [Evaluation(evaluate, config.eval.every)]


def train(config, workdir: str) -> dict:
  """Runs (or resumes) PPO in `workdir`. Returns the last iteration's metrics."""
  langs = prompts_lib.parse_langs(config.data.lang)
  controller = controller_from_config(config, tuple(langs))
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.axis_rules(config.get("axis_rules"))
  hyper = check_config(config, langs, mesh, rules)  # bad hyperparameters fail here
  tokenizer = load_tokenizer(config, workdir)
  models, sources = resolve_models(config, tokenizer)
  check_lengths(config, models)

  total = config.train.steps
  tx = make_optimizer(tuple(sorted(config.optim.to_dict().items())),
                      total * hyper.epochs * hyper.minibatches)
  (state, frozen), (state_shardings, _) = create_models(
      models, tx, controller, sources["gain"], sources["bias"], mesh, rules, config.seed,
      hyper.optimizer, hyper.critic_trunk, loaded_parts(sources, models, hyper))
  prompt_stream = make_prompt_stream(config, tokenizer, langs)
  data = Composite(prompts=prompt_stream, ptx=make_ptx_iterator(config, tokenizer))
  frozen = load_frozen(frozen, sources, models)
  extra = ({"base": run_folder.base_identity(sources["sft"], frozen.reference)}
           if models.policy.lora_rank else {})
  run_folder.write_record(workdir, model_config=models.policy, tokenizer=tokenizer,
                          kind="policy", extra=extra)
  ckpt = run_folder.checkpointer(workdir, max_to_keep=config.train.max_to_keep)
  # The EMA slot only gives a restore its shapes and shardings.
  target = state.replace(ema=state.params["policy"] if hyper.ema_decay else None)
  state, start = resume(ckpt, target, data)
  if start is None:
    state = load_trainable(state.replace(ema=None), frozen, state_shardings, sources, hyper)
  check_filled(state, frozen)
  log.info("PPO: policy %s, critic/RM %s, mesh %s", models.policy, models.critic,
           dict(mesh.shape))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    rollout_fn, experience_fn, update_fn = make_step_fns(models, hyper, controller, tx,
                                                         tokenizer, config, state_shardings)
    step = Iteration(rollout_fn, experience_fn, update_fn, frozen, mesh, rules, prompt_stream,
                     last_good=ckpt.latest_step, lora=bool(models.policy.lora_rank),
                     langs=tuple(langs))
    evaluations = make_evaluations(config, tokenizer, langs, models, frozen, workdir, mesh,
                                   rules)
    _, last = run_train_loop(config, workdir, state, step, data, ckpt, total=total,
                             loss_key="objective/scores", summarize=iteration.summarize,
                             evaluations=evaluations)
  return last
