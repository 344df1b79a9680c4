"""PPO's models: drawn straight into their sharded layout (`create_models`), then filled from
their runs: the SFT checkpoint into the policy and the reference, the reward model's into the
frozen RM and the critic (`load_frozen`, `load_trainable`; a resumed run skips the latter).
The parts the runs fill are never drawn (`loaded_parts`)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.core import run_folder, sharding
from rlhf_jax.core.sharding import copy_tree
from rlhf_jax.models import ScalarModel, Transformer, lora
from rlhf_jax.rl import kl, ppo
from rlhf_jax.rl import state as state_lib


# The parts of (PPOState, Frozen) a run can load instead of drawing (loaded_parts).
_PARTS = ("policy", "critic", "reference", "reward")


def _with_parts(state: ppo.PPOState, frozen: ppo.Frozen, parts: frozenset, part_fn):
  """(state, frozen) with each named part replaced by part_fn(name)."""
  params = {k: (part_fn(k) if k in parts else v) for k, v in state.params.items()}
  frozen = frozen._replace(**{k: part_fn(k) for k in ("reference", "reward") if k in parts})
  return state.replace(params=params), frozen


@functools.lru_cache(maxsize=4)
def _initializer(models: ppo.PPOModels, tx, controller: kl.KLController, mesh, rules, seed: int,
                 optimizer: str = "joint", critic_trunk: str = "trained",
                 loaded: frozenset = frozenset()):
  """(init, shardings) of the random (PPOState, Frozen); see `create_models`."""
  unknown = set(loaded) - set(_PARTS)
  if unknown:
    raise ValueError(f"loaded parts {sorted(unknown)}: not among {_PARTS}")
  k_policy, k_reward, k_state = jax.random.split(jax.random.key(seed), 3)

  def init(_):
    tokens = jnp.zeros((1, 8), jnp.int32)
    inputs = (tokens, tokens, jnp.ones_like(tokens))
    policy = Transformer(models.policy).init(k_policy, *inputs)["params"]
    critic = ScalarModel(models.critic).init(k_reward, *inputs)["params"]
    if models.policy.lora_rank:  # adapters (and the critic's head) train; the bases are frozen
      (policy, base), (critic, _) = lora.split(policy), lora.split(critic)
    else:
      base = policy
    if critic_trunk == "frozen":  # a value head on the RM's trunk: the head alone trains
      critic = {"head": critic["head"]}
    params = {"policy": policy, "critic": critic}
    state = ppo.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                         opt_state=ppo.init_opt_state(tx, params, optimizer), ema=None,
                         kl_coef=controller.initial(),
                         rng=jax.random.key_data(k_state))
    reward = ScalarModel(models.reward).init(k_reward, *inputs)["params"]
    if models.reward.lora_rank:  # a shared base: the RM's trunk is the reference's
      reward, _ = lora.split(reward)
    frozen = ppo.Frozen(reference=base, reward=reward,
                        reward_gain=jnp.ones((), jnp.float32),
                        reward_bias=jnp.zeros((), jnp.float32))
    return state, frozen

  # Shardings from the logical axis names of the abstract (boxed) tree; no rules in scope while
  # tracing, the out_shardings alone place every shard (as sharding.create_sharded does).
  shapes = jax.eval_shape(init, 0)
  shardings = sharding.logical_shardings(shapes, mesh, rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.unbox(shapes), shardings)
  # The loaded parts leave the jitted init's outputs, so XLA drops their random draws (a
  # tiny model's init compiled in ~5 s, mostly those draws' kernels); the optimizer's zeros
  # need only the shapes.
  empty = lambda name: {}
  abstract_state, abstract_frozen = abstract
  abstract_part = lambda name: (abstract_state.params[name] if name in abstract_state.params
                                else getattr(abstract_frozen, name))
  drawn = jax.jit(lambda x: _with_parts(*nn.unbox(init(x)), loaded, empty),
                  out_shardings=_with_parts(*shardings, loaded, empty))
  return (lambda x: _with_parts(*drawn(x), loaded, abstract_part)), shardings


def create_models(models: ppo.PPOModels, tx, controller, gain: float, bias: float, mesh,
                  rules, seed: int, optimizer: str = "joint", critic_trunk: str = "trained",
                  loaded: frozenset = frozenset()):
  """((PPOState, Frozen), their shardings): random params laid out on the mesh, in one jit.

  The policy and the reference are drawn with one key, as are the critic and the reward
  model, so random ones start equal exactly as loaded ones do (and XLA draws each once).
  `loaded` ('policy', 'critic', 'reference', 'reward'): parts the caller fills from its runs
  (rl/weights.py): left as ShapeDtypeStructs with their shardings, never drawn.
  """
  init, (state_shardings, frozen_shardings) = _initializer(models, tx, controller, mesh, rules,
                                                           seed, optimizer, critic_trunk,
                                                           frozenset(loaded))
  with jax.set_mesh(mesh):
    state, frozen = init(0)
  frozen = frozen._replace(
      reward_gain=jax.device_put(np.float32(gain), frozen_shardings.reward_gain),
      reward_bias=jax.device_put(np.float32(bias), frozen_shardings.reward_bias))
  return (state, frozen), (state_shardings, frozen_shardings)


def loaded_parts(sources: dict, models: ppo.PPOModels, hyper: ppo.PPOHyper) -> frozenset:
  """The parts of (PPOState, Frozen) that load_frozen and load_trainable fill from the runs
  ('policy', 'critic', 'reference', 'reward'): create_models leaves them abstract
  rather than drawing random values only to overwrite them. Mirrors the two functions below."""
  parts = set()
  adapted = bool(models.policy.lora_rank)
  if sources["sft"]:
    parts.add("reference")
    if not adapted:  # LoRA: the policy is its fresh adapters
      parts.add("policy")
  if sources["rm"]:
    parts.add("reward")
  if (hyper.critic_trunk == "frozen" or (adapted and sources.get("shared"))
      or (not adapted and sources["rm"])):
    parts.add("critic")
  return frozenset(parts)


def check_filled(state: ppo.PPOState, frozen: ppo.Frozen) -> None:
  """Raises if a part left abstract by create_models was never loaded (a loaded_parts that no
  longer mirrors the loaders): the run would otherwise fail deep inside a jitted step."""
  flat, _ = jax.tree_util.tree_flatten_with_path((state, frozen))
  empty = [jax.tree_util.keystr(path) for path, leaf in flat
           if isinstance(leaf, jax.ShapeDtypeStruct)]
  if empty:
    raise RuntimeError(f"PPO's state has {len(empty)} unloaded leaves, e.g. {empty[:3]}: "
                       "rl/weights.loaded_parts names a part the loaders did not fill")


def load_frozen(frozen: ppo.Frozen, sources: dict, models: ppo.PPOModels) -> ppo.Frozen:
  """The SFT params into the reference, the RM checkpoint into the reward model (with a shared
  base, its saved adapters and head as they are, on a trunk checked to be the RM's base). An
  int8 base (lora.base_quant) is read in float32 and quantised (run_folder.restore_base)."""
  if sources["sft"]:
    frozen = frozen._replace(reference=run_folder.restore_base(
        sources["sft"], frozen.reference, models.policy))
  if sources["rm"] and sources.get("shared"):
    run_folder.check_base(sources["rm"], ppo.shared_trunk(frozen))
    frozen = frozen._replace(reward=run_folder.restore_saved_params(sources["rm"],
                                                                   frozen.reward))
  elif sources["rm"]:
    frozen = frozen._replace(reward=run_folder.restore_base(sources["rm"], frozen.reward,
                                                            models.reward))
  return frozen


def load_trainable(state: ppo.PPOState, frozen: ppo.Frozen, state_shardings, sources: dict,
                   hyper: ppo.PPOHyper) -> ppo.PPOState:
  """The SFT params into the policy, the RM (normalisation folded in) into the critic. With
  LoRA the adapters start at zero and only the critic's head comes from the RM (its trunk is
  the frozen RM's own). A head-only critic (critic_trunk="frozen") starts as the RM's head."""
  params = state.params
  adapted = lora.count_adapters(params["policy"])  # LoRA: the adapters start at zero
  if sources["sft"] and not adapted:
    params = {**params, "policy": run_folder.restore_params(sources["sft"], params["policy"])}
  fold = jax.jit(state_lib.fold_normalization, out_shardings=state_shardings.params["critic"])
  # The critic starts as the RM: its head alone (a head-only critic, or LoRA on the RM's own
  # trunk), its adapters and head (a shared base), or all of it (full parameters). The first
  # two read the frozen RM's buffers, so they are copied (the state's are donated).
  if hyper.critic_trunk == "frozen" or (adapted and not sources.get("shared")):
    start = {**params["critic"], "head": frozen.reward["head"]}
  elif adapted:
    start = frozen.reward
  else:
    start = run_folder.restore_params(sources["rm"], params["critic"]) if sources["rm"] else None
  if start is not None:
    critic = fold(start, frozen.reward_gain, frozen.reward_bias)
    aliased = hyper.critic_trunk == "frozen" or adapted
    params = {**params, "critic": copy_tree(critic, state_shardings.params["critic"])
              if aliased else critic}
  ema = copy_tree(params["policy"], state_shardings.params["policy"]) if hyper.ema_decay else None
  return state.replace(params=params, ema=ema)
