"""The PPO host loop: four models in, a policy out. Orchestration only; the step is rl/ppo.py.

Models, all on the same mesh:
  policy      trained; from the SFT checkpoint (`config.sft_dir`)
  reference   frozen; the same SFT params (a separate copy: the policy's buffers are donated)
  critic      trained; a ScalarModel initialised from the reward model, trunk and head, with
              the RM's normalisation folded into its head so its first values are in reward units
  reward      frozen; the RM checkpoint (`config.rm_dir`) and its normalization.json

Per iteration: prompts -> rollout (jit) -> experience (jit) -> NaN check -> update (jit, state
donated). Device values reach the host once per iteration, for the metrics and the checks.
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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.core import optim, sharding
from rlhf_jax.core.metrics import MetricWriter
from rlhf_jax.models import ModelConfig, ScalarModel, Transformer
from rlhf_jax.eval import ppo_periodic as evaluation
from rlhf_jax.rl import kl, ppo
from rlhf_jax.data import prompts as prompts_lib
from rlhf_jax.infer.rollout import make_rollout_fn
from rlhf_jax.infer.sampling import SamplingParams
from rlhf_jax.train import inputs as inputs_lib
from rlhf_jax.train.loop import NonFiniteLossError, Preemption, progress

log = logging.getLogger(__name__)

# Fields of the policy's shape taken from the PPO config even when an SFT checkpoint is given.
NUMERICS_FIELDS = ("dtype", "remat")


class NonFiniteRewardError(NonFiniteLossError):
  """A reward went NaN/inf. That iteration's update was not applied; nothing was saved."""


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
      whiten_rewards=p.whiten_rewards,
      missing_eos_penalty=p.missing_eos_penalty if p.penalize_missing_eos else None,
      ptx_coef=config.ptx.coef, ema_decay=p.ema_decay, recompute_old_logprobs=recompute)


def controller_from_config(config) -> kl.KLController:
  return kl.KLController(init_coef=config.kl.coef, adaptive=config.kl.adaptive,
                         target=config.kl.target, horizon=config.kl.horizon)


def sampling_from_config(section) -> SamplingParams:
  return SamplingParams(temperature=section.temperature, top_k=section.get("top_k", 0),
                        top_p=section.top_p)


# ---------------------------------------------------------------------------------------------
# Where the models come from.


def _checkpoint_dir(workdir: str, what: str) -> str:
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{what} workdir {workdir} has no checkpoints/ directory")
  return directory


def read_checkpoint_model(directory: str, kind: str, numerics) -> ModelConfig:
  """The ModelConfig a checkpoint was trained with (its vocabulary read off the embedding),
  with this run's compute dtype and remat. Reads metadata only: nothing is loaded."""
  from rlhf_jax.infer.rm_scores import model_config_from_saved
  ckpt = ckpt_lib.Checkpointer(directory, max_to_keep=None, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    saved_config = ckpt.read_config(step) or {}
    tree = ckpt.manager.item_metadata(step)["params"]
    tree = getattr(tree, "tree", tree)
  finally:
    ckpt.close()
  expected = {"policy": "embed", "reward model": "trunk"}[kind]
  if expected not in tree or "model" not in saved_config:
    raise ValueError(f"{directory} does not hold a {kind} checkpoint (params {sorted(tree)}, "
                     f"config sections {sorted(saved_config)})")
  config = model_config_from_saved(saved_config, tree)
  return dataclasses.replace(config, **{k: numerics[k] for k in NUMERICS_FIELDS})


def check_vocab(what: str, where: str, vocab: int, tokenizer) -> None:
  if vocab != tokenizer.vocab_size:
    raise ValueError(
        f"the {what} checkpoint {where} has a vocabulary of {vocab} tokens but the policy's "
        f"tokenizer {tokenizer.path} has {tokenizer.vocab_size}: every model of a PPO run must "
        "use the same tokenizer (set tokenizer.path to the one the SFT and RM runs used)")


def load_tokenizer(config, workdir: str):
  """config.tokenizer.path, else the SFT run's tokenizer, else one trained into the workdir."""
  from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
  if config.tokenizer.path:
    return load_any_tokenizer(config.tokenizer.path)
  if config.sft_dir:
    candidates = [os.path.join(config.sft_dir, "tokenizer", "tokenizer.model")]
    try:
      saved = ckpt_lib.Checkpointer(_checkpoint_dir(config.sft_dir, "SFT"), max_to_keep=None,
                                    async_save=False)
      path = (saved.read_config() or {}).get("tokenizer", {}).get("path", "")
      saved.close()
      candidates.insert(0, path)
    except (FileNotFoundError, KeyError, TypeError):
      pass
    for path in filter(None, candidates):
      if os.path.exists(path) or (path and not path.endswith(".model")):
        return load_any_tokenizer(path)
    raise FileNotFoundError(f"no tokenizer found for SFT run {config.sft_dir}; set "
                            "tokenizer.path")
  tokenizer, _ = inputs_lib.load_tokenizer(config, workdir)
  return tokenizer


def resolve_models(config, tokenizer) -> tuple[ppo.PPOModels, dict]:
  """Shapes of the four models and where their params come from; all checks, no compiling."""
  if config.sft_dir:
    sft_ckpt = _checkpoint_dir(config.sft_dir, "SFT")
    policy = read_checkpoint_model(sft_ckpt, "policy", config.model)
    check_vocab("SFT", sft_ckpt, policy.vocab_size, tokenizer)
  else:
    log.warning("no sft_dir: the policy and the reference start from random params")
    sft_ckpt = None
    fields = {k: v for k, v in config.model.to_dict().items() if k != "size"}
    policy = ModelConfig.from_config({**fields, "vocab_size": tokenizer.vocab_size})

  gain, bias = 1.0, 0.0
  if config.rm_dir:
    from rlhf_jax.infer.rm_scores import read_normalization
    rm_ckpt = _checkpoint_dir(config.rm_dir, "reward model")
    reward = read_checkpoint_model(rm_ckpt, "reward model", config.model)
    check_vocab("reward model", rm_ckpt, reward.vocab_size, tokenizer)
    norm = read_normalization(config.rm_dir)  # PPO needs the RM's scale pinned
    gain, bias = float(norm["gain"]), float(norm["bias"])
  else:
    log.warning("no rm_dir: the reward model and the critic start from random params")
    rm_ckpt = None
    reward = policy
  models = ppo.PPOModels(policy=policy, critic=reward, reward=reward)
  return models, {"sft": sft_ckpt, "rm": rm_ckpt, "gain": gain, "bias": bias}


# ---------------------------------------------------------------------------------------------
# Sharded state.


@functools.lru_cache(maxsize=8)
def make_optimizer(optim_items: tuple, total_updates: int):
  """optim.make_optimizer, one object per settings, so the jitted functions built on it can
  be cached too: several runs in one process (sweeps, notebooks, tests) compile once."""
  import ml_collections
  return optim.make_optimizer(ml_collections.ConfigDict(dict(optim_items)), total_updates)


@functools.lru_cache(maxsize=4)
def _initializer(models: ppo.PPOModels, tx, controller: kl.KLController, mesh, rules, seed: int):
  """(jitted init, shardings) of the random (PPOState, Frozen); see `create_models`."""
  k_policy, k_reward, k_state = jax.random.split(jax.random.key(seed), 3)

  def init(_):
    tokens = jnp.zeros((1, 8), jnp.int32)
    inputs = (tokens, tokens, jnp.ones_like(tokens))
    policy = Transformer(models.policy).init(k_policy, *inputs)["params"]
    critic = ScalarModel(models.critic).init(k_reward, *inputs)["params"]
    params = {"policy": policy, "critic": critic}
    state = ppo.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                         opt_state=tx.init(params), ema=None, kl_coef=controller.initial(),
                         rng=jax.random.key_data(k_state))
    frozen = ppo.Frozen(reference=policy,
                        reward=ScalarModel(models.reward).init(k_reward, *inputs)["params"],
                        reward_gain=jnp.ones((), jnp.float32),
                        reward_bias=jnp.zeros((), jnp.float32))
    return state, frozen

  # Shardings from the logical axis names of the abstract (boxed) tree; no rules in scope while
  # tracing, the out_shardings alone place every shard (as sharding.create_sharded does).
  shardings = sharding.logical_shardings(jax.eval_shape(init, 0), mesh, rules)
  return jax.jit(lambda x: nn.unbox(init(x)), out_shardings=shardings), shardings


def create_models(models: ppo.PPOModels, tx, controller, gain: float, bias: float, mesh,
                  rules, seed: int):
  """((PPOState, Frozen), their shardings): random params laid out on the mesh, in one jit.

  The policy and the reference are drawn with one key, as are the critic and the reward
  model, so random ones start equal exactly as loaded ones do (and XLA draws each once).
  """
  init, (state_shardings, frozen_shardings) = _initializer(models, tx, controller, mesh, rules,
                                                           seed)
  with jax.set_mesh(mesh):
    state, frozen = init(0)
  frozen = frozen._replace(
      reward_gain=jax.device_put(np.float32(gain), frozen_shardings.reward_gain),
      reward_bias=jax.device_put(np.float32(bias), frozen_shardings.reward_bias))
  return (state, frozen), (state_shardings, frozen_shardings)


def fold_normalization(critic, gain, bias):
  """A scalar model whose output is gain · output + bias: the head's kernel and bias scaled."""
  head = critic["head"]["dense"]
  dense = {"kernel": head["kernel"] * gain, "bias": head["bias"] * gain + bias}
  return {**critic, "head": {**critic["head"], "dense": dense}}


def copy_tree(tree, shardings):
  """A copy in fresh buffers (a tree that aliases the state would be donated with it)."""
  return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


def load_frozen(frozen: ppo.Frozen, sources: dict) -> ppo.Frozen:
  """The SFT params into the reference, the RM checkpoint into the reward model."""
  if sources["sft"]:
    frozen = frozen._replace(reference=ckpt_lib.restore_params(sources["sft"],
                                                               frozen.reference))
  if sources["rm"]:
    frozen = frozen._replace(reward=ckpt_lib.restore_params(sources["rm"], frozen.reward))
  return frozen


def load_trainable(state: ppo.PPOState, frozen: ppo.Frozen, state_shardings, sources: dict,
                   hyper: ppo.PPOHyper) -> ppo.PPOState:
  """The SFT params into the policy, the RM (normalisation folded in) into the critic."""
  params = state.params
  if sources["sft"]:
    params = {**params, "policy": ckpt_lib.restore_params(sources["sft"], params["policy"])}
  if sources["rm"]:
    critic = ckpt_lib.restore_params(sources["rm"], params["critic"])
    fold = jax.jit(fold_normalization, out_shardings=state_shardings.params["critic"])
    params = {**params, "critic": fold(critic, frozen.reward_gain, frozen.reward_bias)}
  state = state.replace(params=params)
  if hyper.ema_decay:
    state = state.replace(ema=copy_tree(params["policy"], state_shardings.params["policy"]))
  return state


def train_items(state: ppo.PPOState) -> dict:
  """What a checkpoint's `train` item holds (the policy is saved as `params`)."""
  items = {"step": state.step, "critic": state.params["critic"], "opt_state": state.opt_state,
           "kl_coef": state.kl_coef, "rng": state.rng}
  if state.ema is not None:
    items["ema"] = state.ema
  return items


def from_train_items(state: ppo.PPOState, policy, items: dict) -> ppo.PPOState:
  return state.replace(step=items["step"], params={"policy": policy, "critic": items["critic"]},
                       opt_state=items["opt_state"], kl_coef=items["kl_coef"], rng=items["rng"],
                       ema=items.get("ema"))


# ---------------------------------------------------------------------------------------------
# Inputs.


def make_prompt_stream(config, tokenizer, langs):
  from rlhf_jax.data import builders, pipeline
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
  from rlhf_jax.data import builders, pipeline
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
  from rlhf_jax.data import builders, pipeline
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
      ref_logprobs_fn=cached_jit(ppo.answer_logprobs, model_config=models.policy,
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

  def update(state, experience, ptx):
    ptx = split_ptx(ptx, hyper.minibatches) if ptx is not None else None
    return ppo.ppo_update(state, experience, ptx, models=models, hyper=hyper,
                          controller=controller, tx=tx)

  return jax.jit(update, in_shardings=(state_shardings, None, None),
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


def train(config, workdir: str) -> dict:
  """Runs (or resumes) PPO in `workdir`. Returns the last iteration's metrics."""
  hyper = hyper_from_config(config)  # bad hyperparameters fail here, before any work
  controller = controller_from_config(config)
  langs = prompts_lib.parse_langs(config.data.lang)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.axis_rules(config.get("axis_rules"))
  hyper.check_batch(config.data.batch_size, sharding.batch_shards(mesh, rules))
  if config.data.batch_size % len(langs):
    raise ValueError(f"data.batch_size={config.data.batch_size} must split evenly over the "
                     f"languages {langs}")
  tokenizer = load_tokenizer(config, workdir)
  models, sources = resolve_models(config, tokenizer)
  need = config.data.max_prompt_len + max(config.sampling.max_new_tokens,
                                          config.eval.max_new_tokens)
  if need > models.policy.max_len:
    raise ValueError(f"data.max_prompt_len + max_new_tokens = {need} exceeds the policy's "
                     f"max_len={models.policy.max_len}")

  total = config.train.steps
  tx = make_optimizer(tuple(sorted(config.optim.to_dict().items())),
                      total * hyper.epochs * hyper.minibatches)
  (state, frozen), (state_shardings, _) = create_models(
      models, tx, controller, sources["gain"], sources["bias"], mesh, rules, config.seed)
  prompt_stream = make_prompt_stream(config, tokenizer, langs)
  ptx_iter = make_ptx_iterator(config, tokenizer)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               max_to_keep=config.train.max_to_keep)
  frozen = load_frozen(frozen, sources)
  start = ckpt.latest_step()
  if start is not None:
    # The EMA slot only gives the restore its shapes and shardings.
    target = state.replace(ema=state.params["policy"] if hyper.ema_decay else None)
    policy, items, data_state, _ = ckpt.restore(start, state.params["policy"],
                                                train_items(target))
    state = from_train_items(state, policy, items)
    if data_state:
      prompt_stream.set_state(data_state["prompts"])
      if ptx_iter is not None and data_state.get("ptx"):
        ptx_iter.set_state(data_state["ptx"])
    log.info("resumed from %s at iteration %d", ckpt.directory, start)
  else:
    state = load_trainable(state, frozen, state_shardings, sources, hyper)
  log.info("PPO: policy %s, critic/RM %s, mesh %s", models.policy, models.critic,
           dict(mesh.shape))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    fns = make_step_fns(models, hyper, controller, tx, tokenizer, config, state_shardings)
    evaluator = (make_evaluator(config, tokenizer, langs, models, workdir, mesh, rules)
                 if config.eval.n_prompts else None)
    return _host_loop(config, workdir, state, frozen, fns, evaluator, prompt_stream, ptx_iter,
                      ckpt, mesh, rules, int(state.step), total)


def _host_loop(config, workdir, state, frozen, fns, evaluator, prompt_stream, ptx_iter, ckpt,
               mesh, rules, start, total):
  rollout_fn, experience_fn, update_fn = fns
  writer = MetricWriter(workdir)
  preemption = Preemption()
  config_json = config.to_dict()
  bar = progress(total, start, "ppo")
  last: dict[str, Any] = {}
  eval_every = config.eval.every

  def data_state():
    return {"prompts": prompt_stream.get_state(),
            "ptx": ptx_iter.get_state() if ptx_iter is not None else None}

  def save(done, force=False):
    if ckpt.latest_step() != done:
      ckpt.save(done, state.params["policy"], train_items(state), data_state(), config_json,
                force=force)

  try:
    for it in range(start, total):
      done = it + 1
      t0 = time.perf_counter()
      batch = next(prompt_stream)
      prompts = sharding.make_global_batch({"tokens": batch["tokens"], "mask": batch["mask"]},
                                           mesh, rules)
      key = jax.random.fold_in(state.key(), 0)
      rollout = jax.block_until_ready(
          rollout_fn({"params": state.params["policy"]}, prompts["tokens"], prompts["mask"], key))
      t1 = time.perf_counter()
      experience, exp_metrics = experience_fn(state.params, frozen, rollout, state.kl_coef)
      exp_metrics = jax.device_get(exp_metrics)
      scores, seq_kl = evaluation.to_host(experience.scores), evaluation.to_host(experience.kl)
      t2 = time.perf_counter()
      if not bool(exp_metrics.pop("finite")):
        good = ckpt.latest_step()
        raise NonFiniteRewardError(
            f"a reward is NaN/inf at iteration {done}: stopped before its update. The last "
            f"good checkpoint ({'iteration ' + str(good) if good is not None else 'none'}) in "
            f"{ckpt.directory} is kept.")
      ptx = None
      if ptx_iter is not None:
        local = next(ptx_iter)
        ptx = sharding.make_global_batch({k: local[k] for k in (
            "inputs", "targets", "positions", "segment_ids", "loss_mask")}, mesh, rules)
      state, stats = update_fn(state, experience, ptx)
      stats = jax.device_get(stats)
      t3 = time.perf_counter()

      metrics = {k: float(v) for k, v in exp_metrics.items()}
      metrics.update(ppo.summarize_update(stats))
      if metrics["ppo/skipped_updates"]:
        log.warning("iteration %d: %d minibatch updates had a non-finite loss or gradient and "
                    "were skipped", done, int(metrics["ppo/skipped_updates"]))
      # Every process's rows are laid out alike, so the global rows' languages repeat.
      row_langs = np.tile(np.asarray(batch["lang"]), jax.process_count())
      if len(set(batch["lang"])) > 1:
        for lang in sorted(set(batch["lang"])):
          metrics[f"objective/{lang}/scores"] = float(np.mean(scores[row_langs == lang]))
          metrics[f"objective/{lang}/kl"] = float(np.mean(seq_kl[row_langs == lang]))
      episodes = config.data.batch_size
      metrics.update({
          "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2,
          "time/iteration": t3 - t0, "train/episodes_per_s": episodes / max(t3 - t0, 1e-9),
          "train/tokens": metrics.pop("rollout/tokens"),
          "rollout/skipped_prompts": float(prompt_stream.skipped),
      })
      if evaluator is not None and ((eval_every and done % eval_every == 0) or done == total):
        t4 = time.perf_counter()
        policy = state.ema if state.ema is not None else state.params["policy"]
        metrics.update(evaluator(done, policy, frozen))
        metrics["time/eval"] = time.perf_counter() - t4
      if done % config.train.log_every == 0 or done == total:
        writer.write(done, metrics)
      bar.set_postfix(score=f"{metrics['objective/scores']:.3f}",
                      kl=f"{metrics['objective/kl']:.2f}",
                      ep_s=f"{metrics['train/episodes_per_s']:.1f}")
      bar.update(1)
      last = metrics
      if done % config.train.checkpoint_every == 0 or done == total:
        save(done)
      if done == config.train.get("stop_after", 0):
        save(done, force=True)
        log.info("stopped after iteration %d as configured (train.stop_after)", done)
        break
      if preemption.requested():
        save(done, force=True)
        log.warning("preempted at iteration %d; checkpoint saved", done)
        last["preempted_at"] = done
        break
  finally:
    bar.close()
    ckpt.close()
    writer.close()
    preemption.close()
  return last
