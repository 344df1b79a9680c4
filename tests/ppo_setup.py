"""Builders shared by the PPO tests (not a test module): a tiny policy, critic and reward
model with random params drawn in numpy, left-padded prompts, and one PPO iteration."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.models import ScalarModel, Transformer, model_config
from rlhf_jax.rl import kl, ppo
from rlhf_jax.infer import rollout
from rlhf_jax.infer.sampling import SamplingParams

V = 64
PAD = 0
STOP = 1
CFG = model_config("tiny", vocab_size=V)
MODELS = ppo.PPOModels(policy=CFG, critic=CFG, reward=CFG)


def random_params(module, seed, scale=0.1):
  """Params with the module's own tree, drawn in numpy (compiling an init costs seconds)."""
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), tokens, tokens, tokens))
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "embedding" in name:
      x = rng.normal(0.0, 1.0, leaf.shape)
    elif "scale" in name:
      x = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    elif "bias" in name:
      x = np.zeros(leaf.shape)
    else:
      x = rng.normal(0.0, scale, leaf.shape)
    return jnp.asarray(x, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


def policy_params(seed=0):
  return random_params(Transformer(CFG), seed)


def scalar_params(seed=1):
  return random_params(ScalarModel(CFG), seed)


def prompts(batch, width=6, seed=0, min_len=1):
  """Left-padded random prompts [B, width] (ragged lengths) and their mask."""
  rng = np.random.RandomState(seed)
  lengths = rng.randint(min_len, width + 1, size=batch)
  lengths[0] = width
  tokens = np.full((batch, width), PAD, np.int32)
  mask = np.zeros((batch, width), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, width - n:] = rng.randint(2, V, size=n)
    mask[i, width - n:] = 1
  return jnp.asarray(tokens), jnp.asarray(mask)


def minibatch_with_ptx(policy, batch=4, new_tokens=6, temperature=0.7, seed=1):
  """(Experience, ptx batch) for loss checks: answers sampled from `policy` to random prompts,
  random old values, advantages and returns, and 2 x 8 random LM tokens for PPO-ptx."""
  tokens, mask = prompts(batch, seed=3)
  ro = rollout.make_rollout_fn(CFG, new_tokens, (), PAD, SamplingParams(temperature=temperature))(
      {"params": policy}, tokens, mask, jax.random.key(0))
  n = ro.answer_mask.shape[1]
  rng = np.random.default_rng(seed)
  normal = lambda: jnp.asarray(rng.normal(size=(batch, n)), jnp.float32)  # noqa: E731
  exp = ppo.Experience(rollout=ro, old_logprobs=ro.logprobs, old_values=normal(),
                       advantages=normal(), returns=normal(), scores=jnp.zeros(batch),
                       kl=jnp.zeros(batch))
  ptx_tokens = rng.integers(0, V, (2, 9))
  ptx = {"inputs": ptx_tokens[:, :-1], "targets": ptx_tokens[:, 1:],
         "positions": np.broadcast_to(np.arange(8), (2, 8)),
         "segment_ids": np.ones((2, 8), np.int32), "loss_mask": np.ones((2, 8), np.float32)}
  return exp, ptx


def frozen(reference, reward=None, gain=1.0, bias=0.0):
  reward = scalar_params(1) if reward is None else reward
  return ppo.Frozen(reference=reference, reward=reward,
                    reward_gain=jnp.asarray(gain, jnp.float32),
                    reward_bias=jnp.asarray(bias, jnp.float32))


def make_state(policy, critic, tx, kl_coef=0.0, ema=False, seed=0, optimizer="joint"):
  params = {"policy": policy, "critic": critic}
  return ppo.PPOState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=ppo.init_opt_state(tx, params, optimizer),
                      ema=policy if ema else None, kl_coef=jnp.asarray(kl_coef, jnp.float32),
                      rng=jax.random.key_data(jax.random.key(seed)))


class Runner:
  """The three jitted phases of an iteration, as the trainer builds them."""

  def __init__(self, hyper, controller=None, lr=1e-3, max_new_tokens=8, stop_ids=(STOP,),
               reward_fn=None, sampling=None):
    self.hyper = hyper
    self.controller = controller or kl.KLController(init_coef=0.0)
    self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    sampling = sampling or SamplingParams(temperature=hyper.temperature)
    self.rollout_fn = rollout.make_rollout_fn(CFG, max_new_tokens, stop_ids, PAD, sampling)
    self.experience_fn = jax.jit(functools.partial(
        ppo.make_experience, models=MODELS, hyper=hyper, reward_fn=reward_fn))
    self.update_fn = jax.jit(functools.partial(
        ppo.ppo_update, models=MODELS, hyper=hyper, controller=self.controller, tx=self.tx))

  def iteration(self, state, fz, prompt_tokens, prompt_mask, ptx=None):
    key = jax.random.fold_in(state.key(), 0)
    ro = self.rollout_fn({"params": state.params["policy"]}, prompt_tokens, prompt_mask, key)
    exp, metrics = self.experience_fn(state.params, fz, ro, state.kl_coef)
    new_state, stats = self.update_fn(state, exp, ptx)
    return new_state, ro, exp, metrics, stats
