"""An int8 frozen base under LoRA (models/quant.py): the quantisation against a numpy
reference, the model's int8 params laid out as `quantize_tree` makes them, the adapted model on
an int8 base computing exactly the float model on the dequantised kernels (logits and adapter
gradients), the LoRA SFT trainer holding and keeping an int8 base and folding onto it, and PPO
on an int8 base starting at the reference."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import ppo_setup as S
from helpers import flat_params, tiny_lm_config
from test_ppo import CONTROLLER, HYPER, N, planted_reward

from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.core import run_folder
from rlhf_jax.infer import rollout
from rlhf_jax.infer.sampling import SamplingParams
from rlhf_jax.models import ScalarModel, Transformer, lora, quant
from rlhf_jax.rl import ppo
from rlhf_jax.train import lm

pytestmark = pytest.mark.xdist_group("quant_base")

T = 8


def _flat(tree) -> dict:
  """{'layer_0/attn/q/kernel': array}: flat_params with slash paths."""
  return {k.strip("[]'").replace("']['", "/"): v for k, v in flat_params(tree).items()}


def _inputs(vocab, batch=2, seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (batch, T), 0, vocab)
  positions = np.broadcast_to(np.arange(T), (batch, T))
  return tokens, positions, np.ones((batch, T), np.int32)


def test_quantize_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)  # a scanned 'o': [L, H, Dh, D]
  w[1, :, :, 2] = 0.0  # an all-zero column keeps q = 0
  q, scale = quant.quantize(w, n_in=2, lead=1)
  # Per output column (layer, d): the largest |w| over the two input axes maps to 127.
  ref_scale = np.abs(w).max(axis=(1, 2), keepdims=True) / 127.0
  ref_scale[ref_scale == 0] = 1.0
  ref_q = np.clip(np.round(w / ref_scale), -127, 127).astype(np.int8)
  assert scale.shape == (3, 1, 1, 6) and q.dtype == jnp.int8
  np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q), ref_q)
  back = np.asarray(quant.dequantize(q, scale))
  assert np.all(np.abs(back - w) <= np.asarray(scale) / 2 * (1 + 1e-5))
  assert np.abs(np.asarray(q)).max() == 127


@pytest.mark.parametrize("scan", [False, True])
def test_the_adapted_model_on_an_int8_base_is_the_float_model_on_its_dequantised_kernels(scan):
  cfg = dataclasses.replace(S.CFG, scan_layers=scan)
  qcfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0, lora_base_quant="int8",
                             lora_targets=r"(attn/(q|o)|mlp/(up|down))$")
  tokens, positions, segments = _inputs(cfg.vocab_size)
  base = S.random_params(Transformer(cfg), 0)
  qbase = quant.quantize_tree(base, qcfg)
  # The quantised tree is the layout the model itself creates: int8 kernels for the targeted
  # projections only, each with its scale; k, v and gate stay float32.
  like = nn.unbox(jax.eval_shape(Transformer(qcfg).init, jax.random.key(0), tokens, positions,
                                 segments)["params"])
  adapters, frozen_like = lora.split(like)
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), qbase)
          == jax.tree.map(lambda x: (x.shape, x.dtype), frozen_like))
  names = _flat(qbase)
  int8 = sorted(k for k, v in names.items() if v.dtype == np.int8)
  assert len(int8) == 4 * (1 if scan else cfg.n_layers), int8
  assert all(any(p in k for p in ("attn/q", "attn/o", "mlp/up", "mlp/down")) for k in int8)

  rng = np.random.default_rng(1)
  adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), jnp.float32),
                          adapters)
  deq = quant.dequantize_tree(qbase)
  float_cfg = dataclasses.replace(qcfg, lora_base_quant="")

  @functools.partial(jax.jit, static_argnums=0)
  def logits(config, params):
    return Transformer(config).apply({"params": params}, tokens, positions, segments)[0]

  on_int8 = logits(qcfg, lora.merge(adapters, qbase))
  on_float = logits(float_cfg, lora.merge(adapters, deq))
  scale = float(jnp.max(jnp.abs(on_float)))
  assert float(jnp.max(jnp.abs(on_int8 - on_float))) <= 1e-5 * scale
  # The reference (adapters off) reads the same int8 params; folding gives the same function.
  np.testing.assert_allclose(logits(lora.base_config(qcfg), qbase),
                             logits(cfg, deq), rtol=1e-5, atol=1e-5 * scale)
  folded = lora.fold(lora.merge(adapters, qbase), qcfg)
  assert float(jnp.max(jnp.abs(logits(lora.folded_config(qcfg), folded) - on_int8))) \
      <= 1e-5 * scale
  # Quantisation did change the base (the checks above compare like with like).
  error = float(jnp.max(jnp.abs(logits(cfg, base) - logits(cfg, deq))))
  assert 1e-4 * scale < error < 0.05 * scale

  # The adapters' gradient on the int8 base is the float model's on the dequantised kernels.
  def loss(adapter_params, config, frozen):
    out = logits(config, lora.merge(adapter_params, frozen))
    return jnp.mean(jax.nn.log_softmax(out)[..., 3])

  grad = jax.jit(jax.grad(loss), static_argnums=1)  # jitted: see test_ppo's per-model test
  g_int8 = flat_params(grad(adapters, qcfg, qbase))
  g_float = flat_params(grad(adapters, float_cfg, deq))
  for name in g_float:
    np.testing.assert_allclose(g_int8[name], g_float[name], rtol=1e-4,
                               atol=1e-5 * np.abs(g_float[name]).max(), err_msg=name)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("quant") / "base")
  lm.train(tiny_lm_config(steps=2), workdir)
  return workdir


def _int8_config(base, steps=3):
  config = tiny_lm_config(steps=steps)
  config.init_from = base
  config.lora.rank = 4
  config.lora.alpha = 8.0
  config.lora.base_quant = "int8"
  config.optim.learning_rate = 1e-2
  return config


@pytest.mark.heavy  # two tiny trainings; make test keeps the model-level and PPO checks here
def test_lora_sft_holds_an_int8_base_keeps_it_and_folds_onto_it(base_run, tmp_path):
  config = _int8_config(base_run)
  model = lm.build_model(config, config.model.vocab_size)
  tx = optax.adam(1e-2)
  mesh, rules = lm.setup_mesh(config)
  state, _ = lm.create_train_state(lm.init_params_fn(model, 16), tx, mesh, rules, 0,
                                   split_lora=True)
  state, _ = lm.load_lora_base(state, base_run, model_config=model.config)
  base = ckpt_lib.read_params(run_folder.checkpoint_dir(base_run))
  expected = _flat(quant.quantize_tree(base, model.config))
  held = _flat(state.frozen)
  assert sorted(held) == sorted(expected)
  for name in expected:
    np.testing.assert_array_equal(held[name], expected[name], err_msg=name)
  kernels = [k for k, v in held.items() if v.dtype == np.int8]
  assert len(kernels) == 7 * 2  # every projection of the 2 tiny layers
  # One byte per weight: the int8 kernels and their scales against their float32 bytes.
  q_bytes = sum(held[k].nbytes + held[k + "_scale"].nbytes for k in kernels)
  float_bytes = sum(4 * held[k].size for k in kernels)
  assert q_bytes < 0.3 * float_bytes

  step = jax.jit(lambda s, b: lm.train_step(s, b, model=model, tx=tx, schedule=lambda _: 0.0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (8, 17))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(16), (8, 16)),
           "segment_ids": np.ones((8, 16), np.int32), "loss_mask": np.ones((8, 16), np.float32)}
  for _ in range(2):
    state, metrics = step(state, batch)
  assert bool(metrics["train/finite"])
  for name, value in _flat(state.frozen).items():
    np.testing.assert_array_equal(value, held[name], err_msg=name)

  # A whole run: its record says int8, and its folded params compute the trained function.
  run = str(tmp_path / "int8")
  lm.train(config, run)
  lora_config = run_folder.model_config(run)
  assert lora_config.lora_base_quant == "int8"
  folded, folded_config = run_folder.load_policy(run)
  assert folded_config.lora_base_quant == "" and not quant.is_quantized(folded)
  saved = ckpt_lib.read_params(run_folder.checkpoint_dir(run))
  tokens, positions, segments = _inputs(folded_config.vocab_size)
  trained = Transformer(lora_config).apply(
      {"params": lora.merge(saved, quant.quantize_tree(base, lora_config))},
      tokens, positions, segments)[0]
  merged = Transformer(folded_config).apply({"params": folded}, tokens, positions, segments)[0]
  scale = float(np.max(np.abs(trained)))
  assert float(np.max(np.abs(trained - merged))) <= 1e-5 * scale


LORA8 = dataclasses.replace(S.CFG, lora_rank=8, lora_alpha=16.0, lora_base_quant="int8")
REWARD8 = dataclasses.replace(S.CFG, lora_base_quant="int8")
MODELS8 = ppo.PPOModels(policy=LORA8, critic=LORA8, reward=REWARD8)


@functools.lru_cache(maxsize=None)
def _step_fns(tx):
  rollout_fn = rollout.make_rollout_fn(LORA8, N, (), S.PAD,
                                       SamplingParams(temperature=HYPER.temperature))
  experience_fn = jax.jit(functools.partial(ppo.make_experience, models=MODELS8, hyper=HYPER,
                                            reward_fn=planted_reward))
  update_fn = jax.jit(functools.partial(ppo.ppo_update, models=MODELS8, hyper=HYPER,
                                        controller=CONTROLLER, tx=tx))
  return rollout_fn, experience_fn, update_fn


def test_lora_ppo_on_an_int8_base_starts_at_the_reference_and_keeps_the_base():
  tokens0 = jnp.zeros((1, 4), jnp.int32)
  init = lambda m, seed: nn.unbox(jax.jit(m.init)(jax.random.key(seed), tokens0, tokens0,  # noqa: E731
                                                  tokens0)["params"])
  policy = lora.split(init(Transformer(LORA8), 0))[0]
  critic = lora.split(init(ScalarModel(LORA8), 1))[0]
  reward = quant.quantize_tree(S.scalar_params(1), REWARD8)
  critic["head"] = jax.tree.map(jnp.zeros_like, reward["head"])
  base = quant.quantize_tree(S.policy_params(0), LORA8)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-3))
  state, frozen = S.make_state(policy, critic, tx), S.frozen(base, reward)
  bases = flat_params(frozen)
  assert sum(v.dtype == np.int8 for v in bases.values()) == 2 * 7 * S.CFG.n_layers

  rollout_fn, experience_fn, update_fn = _step_fns(tx)
  prompt_tokens, mask = S.prompts(16, seed=7)
  for i in range(2):
    key = jax.random.fold_in(state.key(), i)
    ro = rollout_fn({"params": lora.merge(state.params["policy"], frozen.reference)},
                    prompt_tokens, mask, key)
    exp, metrics = experience_fn(state.params, frozen, ro, state.kl_coef)
    new_state, stats = update_fn(state, exp, None, frozen=frozen)
    if i == 0:  # zero adapters on the int8 base are the int8 reference: ratio 1, KL 0
      assert np.abs(np.asarray(exp.kl)).max() < 1e-4
      first = {k: np.asarray(v)[0, 0] for k, v in stats.items()}
      assert abs(first["ppo/policy/ratio"] - 1.0) < 1e-5
    state = new_state
  moved = flat_params(state.params["policy"])
  assert any(np.abs(v).max() > 0 for k, v in moved.items() if "lora_b" in k)
  for name, value in flat_params(frozen).items():
    np.testing.assert_array_equal(value, bases[name], err_msg=name)
