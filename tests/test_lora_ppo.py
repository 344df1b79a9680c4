"""PPO with LoRA: the state holds adapters (and the critic's head) only, the reference is the
frozen base with the adapters off, so the first minibatch runs at ratio 1 and KL 0; the bases
stay bit-identical; and the planted reward rises as in the full-parameter test (test_ppo.py).
An RM trained as LoRA on the SFT run shares its base: PPO holds one set of base weights."""
import dataclasses
import functools
import json
import os
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import ppo_setup as S
from helpers import flat_params
from test_ppo import CONTROLLER, HYPER, N, planted_reward

from rlhf_jax.infer import rollout
from rlhf_jax.infer.sampling import SamplingParams
from rlhf_jax.models import ScalarModel, Transformer, lora, quant
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


# ---------------------------------------------------------------------------------------------
# One base for all four models: an RM trained as LoRA on the SFT run stays adapters on its trunk.


def _shared_base_runs(root, tokenizer_vocab, base_quant=""):
  """An SFT run (random tiny params) and a LoRA RM run on its trunk (random adapters, B not 0,
  and head), written as the stages write them: the RM's record names the SFT run as its base
  (held as `base_quant`: its fingerprint is of the int8 trunk then)."""
  from helpers import write_run
  from rlhf_jax.core import run_folder
  from rlhf_jax.models import heads
  cfg = dataclasses.replace(S.CFG, vocab_size=tokenizer_vocab)
  sft_params = S.random_params(Transformer(cfg), 0)
  sft = str(root / "sft")
  write_run(sft, sft_params, cfg, "", kind="policy")
  rm_cfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0, lora_base_quant=base_quant)
  rm_all = S.random_params(ScalarModel(rm_cfg), 1)  # adapters drawn non-zero: they matter
  adapters, _ = lora.split(rm_all)
  rm = str(root / "rm")
  base = {"trunk": heads.trunk_of(sft_params)}
  base = quant.quantize_tree(base, rm_cfg) if base_quant else base
  run_folder.write_record(rm, model_config=rm_cfg, tokenizer=None, kind="scalar",
                          extra={"base": run_folder.base_identity(sft, base, "trunk")})
  ckpt = run_folder.checkpointer(rm, max_to_keep=None, async_save=False)
  ckpt.save(1, adapters, {"step": np.full((), 1, np.int32)}, {}, {}, force=True)
  ckpt.close()
  with open(os.path.join(rm, "normalization.json"), "w") as f:
    json.dump({"gain": 2.0, "bias": -0.5}, f)
  return sft, rm


def _ppo_models(sft, rm, vocab, base_quant=""):
  """resolve_models, create_models and the loads of the PPO trainer, with LoRA rank 8."""
  from rlhf_jax.config import util as config_util
  from rlhf_jax.core import sharding
  from rlhf_jax.rl import trainer
  config = config_util.load_config("configs/ppo.py:size=tiny,steps=2")
  with config.unlocked():
    config.sft_dir, config.rm_dir = sft, rm
    config.lora.rank, config.lora.alpha = 8, 16.0
    config.lora.base_quant = base_quant
  models, sources = trainer.resolve_models(config, SimpleNamespace(vocab_size=vocab, path="-"))
  mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(None)
  tx = optax.adam(1e-3)
  (state, frozen), (shardings, _) = trainer.create_models(
      models, tx, CONTROLLER, sources["gain"], sources["bias"], mesh, rules, 0,
      loaded=trainer.loaded_parts(sources, models, HYPER))
  frozen = trainer.load_frozen(frozen, sources, models)
  state = trainer.load_trainable(state, frozen, shardings, sources, HYPER)
  trainer.check_filled(state, frozen)  # what the trainer left abstract, the loads filled
  return models, sources, state, frozen


@pytest.mark.parametrize("base_quant", ["", "int8"])
def test_a_lora_rm_on_the_sft_run_shares_its_base_and_scores_as_the_folded_rm(tmp_path,
                                                                            base_quant):
  from rlhf_jax.core import run_folder
  from rlhf_jax.infer import rm_scores
  sft, rm = _shared_base_runs(tmp_path, S.V, base_quant)
  models, sources, state, frozen = _ppo_models(sft, rm, S.V, base_quant)
  assert sources["shared"] and models.reward.lora_rank == 4 and models.critic == models.reward
  assert models.policy.lora_rank == 8
  # In memory: one base (the reference), the RM as its 28 adapter arrays (7 projections x 2 x
  # 2 layers) and its head's 2: no trunk of its own.
  assert lora.count_adapters(frozen.reward) == 28
  assert len(jax.tree.leaves(frozen.reward)) == 30
  assert "trunk" not in lora.strip(frozen.reward)
  assert quant.is_quantized(frozen.reference) == bool(base_quant)
  # The same scores as the RM folded into its base (how chat and evaluation open the run).
  folded, folded_cfg = run_folder.load_scalar_model(rm)
  tokens, mask = S.prompts(4, seed=2)
  positions = jnp.cumsum(mask, -1)
  ro = SimpleNamespace(tokens=tokens, positions=positions, segment_ids=mask)
  ours = ppo.reward_model_scores(frozen, ro, model_config=models.reward)
  want = rm_scores.score_sequences(folded, tokens, positions, mask, mask,
                                   model_config=folded_cfg, gain=2.0, bias=-0.5)
  assert float(jnp.std(want)) > 1e-3  # the scores differ between rows: a real comparison
  np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(want))))
  # The critic starts as the normalised RM: its values at every position are the RM's.
  critic = ppo.full_params(state.params, frozen, models)["critic"]
  values = jax.jit(lambda p: ScalarModel(models.critic).apply({"params": p}, tokens, positions,
                                                                mask))(critic)
  raw = jax.jit(lambda p: ScalarModel(folded_cfg).apply({"params": p}, tokens, positions,
                                                          mask))(folded)
  np.testing.assert_allclose(np.asarray(values), 2.0 * np.asarray(raw) - 0.5, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(raw))))
  # The critic's adapters are a copy, not the RM's buffers (the update donates the state).
  assert all(a is not b for a, b in zip(jax.tree.leaves(state.params["critic"]),
                                        jax.tree.leaves(frozen.reward)))


def test_a_changed_sft_run_under_a_shared_rm_is_an_error_and_another_base_is_not_shared(
    tmp_path):
  from helpers import write_run
  from rlhf_jax.core import run_folder
  sft, rm = _shared_base_runs(tmp_path, S.V)
  # The SFT run's params replaced at the same step: the RM's fingerprint no longer matches.
  import shutil
  shutil.rmtree(os.path.join(sft, "checkpoints"))
  write_run(sft, S.random_params(Transformer(S.CFG), 5), S.CFG, "", kind="policy")
  with pytest.raises(run_folder.RunFolderError, match="fingerprint"):
    _ppo_models(sft, rm, S.V)
  # Another SFT run (the RM's base is not the policy's): the RM is folded, two bases as before.
  other = str(tmp_path / "other_sft")
  write_run(other, S.random_params(Transformer(S.CFG), 6), S.CFG, "", kind="policy")
  assert not run_folder.is_trunk_of(rm, other)


def test_an_int8_ppo_quantises_a_float_rm_instead_of_sharing_its_base(tmp_path):
  """A LoRA RM trained on a float base is not PPO's int8 trunk: PPO folds it and holds it in
  int8, as the critic's trunk; the reference is the SFT run's params quantised."""
  from rlhf_jax.core import run_folder
  sft, rm = _shared_base_runs(tmp_path, S.V)  # the RM's base is float
  models, sources, state, frozen = _ppo_models(sft, rm, S.V, "int8")
  assert not sources["shared"] and not run_folder.is_trunk_of(rm, sft, "int8")
  assert run_folder.is_trunk_of(rm, sft, "")
  # The same SFT run through a symlinked workdir is still the RM's base.
  os.symlink(os.path.dirname(sft), str(tmp_path / "linked"))
  assert run_folder.is_trunk_of(rm, os.path.join(str(tmp_path / "linked"),
                                                 os.path.basename(sft)), "")
  assert (models.policy.lora_base_quant, models.reward.lora_base_quant) == ("int8", "int8")
  sft_params, _ = run_folder.load_policy(sft)
  folded, _ = run_folder.load_scalar_model(rm)
  for held, want in ((frozen.reference, quant.quantize_tree(sft_params, models.policy)),
                     (frozen.reward, quant.quantize_tree(folded, models.reward))):
    held, want = flat_params(held), flat_params(want)
    assert sorted(held) == sorted(want)
    assert sum(v.dtype == np.int8 for v in held.values()) == 7 * S.CFG.n_layers
    for name in want:
      np.testing.assert_array_equal(held[name], want[name], err_msg=name)
