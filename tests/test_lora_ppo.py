"""PPO with LoRA: the state holds adapters (and the critic's head) only, the reference is the
frozen base with the adapters off, so the first minibatch runs at ratio 1 and KL 0; the bases
stay bit-identical; and the planted reward rises as in the full-parameter test (test_ppo.py)."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import ppo_setup as S
from helpers import flat_params
from test_ppo import CONTROLLER, HYPER, N, planted_reward

from rlhf_jax.infer import rollout
from rlhf_jax.infer.sampling import SamplingParams
from rlhf_jax.models import ScalarModel, Transformer, lora
from rlhf_jax.rl import ppo

LORA = dataclasses.replace(S.CFG, lora_rank=8, lora_alpha=16.0)
MODELS = ppo.PPOModels(policy=LORA, critic=LORA, reward=S.CFG)


def _adapters(module, seed):
  tokens = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(jax.jit(module.init)(jax.random.key(seed), tokens, tokens, tokens)["params"])
  return lora.split(params)[0]


def _start():
  """Adapters at zero on the base policy; the critic's trunk is the reward model's, its head
  zeroed (as in test_ppo._start)."""
  base, reward = S.policy_params(0), S.scalar_params(1)
  policy = _adapters(Transformer(LORA), 0)
  critic = _adapters(ScalarModel(LORA), 1)
  critic["head"] = jax.tree.map(jnp.zeros_like, reward["head"])
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-3))
  state = S.make_state(policy, critic, tx)
  return state, S.frozen(base, reward), tx


@functools.lru_cache(maxsize=None)
def _step_fns(tx):
  """The jitted rollout, experience and update, built once: a fresh jax.jit of a fresh partial
  each iteration would compile all three again every time."""
  rollout_fn = rollout.make_rollout_fn(LORA, N, (), S.PAD,
                                       SamplingParams(temperature=HYPER.temperature))
  experience_fn = jax.jit(functools.partial(ppo.make_experience, models=MODELS, hyper=HYPER,
                                            reward_fn=planted_reward))
  update_fn = jax.jit(functools.partial(ppo.ppo_update, models=MODELS, hyper=HYPER,
                                        controller=CONTROLLER, tx=tx))
  return rollout_fn, experience_fn, update_fn


def _iteration(state, frozen, tx, tokens, mask):
  rollout_fn, experience_fn, update_fn = _step_fns(tx)
  key = jax.random.fold_in(state.key(), 0)
  policy = lora.merge(state.params["policy"], frozen.reference)
  ro = rollout_fn({"params": policy}, tokens, mask, key)
  exp, metrics = experience_fn(state.params, frozen, ro, state.kl_coef)
  new_state, stats = update_fn(state, exp, None, frozen=frozen)
  return new_state, exp, metrics, stats


def test_lora_ppo_starts_at_the_reference_trains_adapters_only_and_raises_the_reward():
  state, frozen, tx = _start()
  assert lora.count_adapters(state.params) == len(jax.tree.leaves(state.params)) - 2
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")  # Adam's first moments: trained leaves
  assert len(jax.tree.leaves(mu)) == len(jax.tree.leaves(state.params))
  bases = flat_params(frozen)
  tokens, mask = S.prompts(32, seed=7)

  scores = []
  for i in range(11):
    new_state, exp, metrics, stats = _iteration(state, frozen, tx, tokens, mask)
    scores.append(float(metrics["objective/scores"]))
    if i == 0:  # the reference is the base with the adapters off: the policy at zero adapters
      assert abs(float(metrics["objective/kl"])) < 1e-4
      assert np.abs(np.asarray(exp.kl)).max() < 1e-4
      first = {k: np.asarray(v)[0, 0] for k, v in stats.items()}
      assert abs(first["ppo/policy/ratio"] - 1.0) < 1e-5
      assert first["ppo/policy/approxkl"] < 1e-10
    if i < 10:
      state = new_state
  # The bases (policy's = reference, critic's trunk = reward model's) never moved.
  after = flat_params(frozen)
  for name in bases:
    np.testing.assert_array_equal(after[name], bases[name], err_msg=name)
  # The planted reward rises as in test_ppo.test_planted_reward_rises_within_a_few_iterations.
  start, end = scores[0], scores[-1]
  assert start < 0.5, scores
  assert end > start + 1.0 and end > 3 * start, scores
