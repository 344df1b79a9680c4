"""LoRA dropout reaches the supervised trainers' steps: the SFT, RM and DPO losses of a
dropout model depend on the step's key and differ from the deterministic model's, a dropout of
0 leaves them exactly deterministic, the step uses the state's own key (so a resumed run draws
the same masks). PPO's refusal of a dropout is in test_config_validate.py's BAD table."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import randomize_lora_b

from rlhf_jax.models import ModelConfig, Transformer, lora
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.train import lm
from rlhf_jax.train import objective as objective_lib
from rlhf_jax.train import preference as pref
from rlhf_jax.train import reward as rm_trainer
from rlhf_jax.train.state import TrainState

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=48,
                   max_len=32, lora_rank=4, lora_alpha=8.0)
B, T = 4, 12


def _rows(seed=0):
  tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, BASE.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  return tokens, positions, jnp.ones((B, T), jnp.int32)


def _lm_params(config):
  tokens, positions, segments = _rows()
  params = Transformer(config).init(jax.random.key(0), tokens, positions, segments)["params"]
  return randomize_lora_b(nn.unbox(params), scale=0.1)


def _lm_batch():
  tokens, positions, segments = _rows()
  return {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "positions": positions,
          "segment_ids": segments, "loss_mask": jnp.ones((B, T), jnp.float32)}


def _lm_loss(config, params, key):
  return float(jax.jit(lambda p, k: lm.lm_loss(p, _lm_batch(), Transformer(config), key=k)[0])(
      params, key))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sft_loss_uses_dropout_only_when_set(dropout):
  config = dataclasses.replace(BASE, lora_dropout=dropout)
  params = _lm_params(config)
  plain = float(lm.lm_loss(params, _lm_batch(), Transformer(config))[0])
  one, again, other = (_lm_loss(config, params, jax.random.key(k)) for k in (1, 1, 2))
  assert one == again  # one key, one mask
  if dropout:
    assert abs(one - plain) > 1e-4 * abs(plain) and abs(one - other) > 1e-4 * abs(plain)
  else:  # no dropout: the key changes nothing, bit for bit
    assert one == other == pytest.approx(plain, rel=1e-6)


def _state(params, step=3, seed=5):
  trainable, frozen = lora.split(params)
  tx = optax.sgd(0.1)
  return TrainState(step=jnp.int32(step), params=trainable, opt_state=tx.init(trainable),
                    rng=jax.random.key_data(jax.random.key(seed)), frozen=frozen), tx


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_sft_step_draws_its_masks_from_the_states_key(grad_accum):
  config = dataclasses.replace(BASE, lora_dropout=0.3)
  state, tx = _state(_lm_params(config))
  step = jax.jit(lambda s, b: lm.train_step(s, b, model=Transformer(config), tx=tx,
                                            schedule=lambda _: 0.1, grad_accum=grad_accum))
  loss = float(step(state, _lm_batch())[1]["train/loss"])
  if grad_accum == 1:  # the step's loss is the model's under the state's key: resumable
    expected = _lm_loss(config, state.full_params(state.params), state.key()) / (B * T)
    assert loss == pytest.approx(expected, rel=1e-5)
  assert loss == float(step(state, _lm_batch())[1]["train/loss"])
  other = float(step(state.replace(step=jnp.int32(4)), _lm_batch())[1]["train/loss"])
  assert abs(loss - other) > 1e-6 * abs(loss)  # the next step, another mask


def test_rm_loss_uses_dropout():
  config = dataclasses.replace(BASE, lora_dropout=0.3)
  tokens, positions, segments = _rows()
  model = ScalarModel(config)
  params = randomize_lora_b(nn.unbox(model.init(jax.random.key(0), tokens, positions,
                                                 segments)["params"]), scale=0.1)
  k = 2  # two answers per comparison, [B/2, 2, T]
  batch = {"tokens": tokens.reshape(B // k, k, T), "positions": positions.reshape(B // k, k, T),
           "segment_ids": segments.reshape(B // k, k, T),
           "prefer": jnp.broadcast_to(jnp.array([[0.0, 1.0], [0.0, 0.0]]), (B // k, k, k)),
           "valid": jnp.ones((B // k, k)), "margin": jnp.zeros((B // k, k, k))}
  loss = jax.jit(lambda p, key: rm_trainer.rm_loss(p, batch, key, model=model, kind="ranking",
                                                   reduction="prompt")[0])
  plain = float(loss(params, None))
  one, other = float(loss(params, jax.random.key(1))), float(loss(params, jax.random.key(2)))
  assert one == float(loss(params, jax.random.key(1)))
  assert abs(one - plain) > 1e-4 * abs(plain) and abs(one - other) > 1e-4 * abs(plain)


def test_dpo_policy_uses_dropout_and_its_reference_does_not():
  config = dataclasses.replace(BASE, lora_dropout=0.3)
  params = _lm_params(config)
  tokens, positions, segments = _rows()
  n = 4  # answer columns
  batch = {"tokens": tokens.reshape(B // 2, 2, T), "positions": positions.reshape(B // 2, 2, T),
           "segment_ids": segments.reshape(B // 2, 2, T),
           "answer_mask": jnp.ones((B // 2, 2, n)), "valid": jnp.ones((B // 2,))}
  objective = objective_lib.Objective("dpo", beta=0.1)
  ref_config = lora.base_config(config)
  reference = lora.split(params)[1]

  def loss(key):
    return jax.jit(lambda p, r: pref.preference_loss(
        p, r, batch, key, model_config=config, objective=objective,
        reference_config=ref_config)[0])(params, reference)

  plain, one, other = float(loss(None)), float(loss(jax.random.key(1))), float(loss(
      jax.random.key(2)))
  assert abs(one - plain) > 1e-5 and abs(one - other) > 1e-5
  # The reference's log-probs do not depend on the key: with the policy deterministic, the loss
  # is the plain one whatever key the reference might have seen.
  no_dropout = dataclasses.replace(config, lora_dropout=0.0)
  same = jax.jit(lambda p, r: pref.preference_loss(
      p, r, batch, jax.random.key(1), model_config=no_dropout, objective=objective,
      reference_config=ref_config)[0])(params, reference)
  assert float(same) == pytest.approx(plain, rel=1e-6)
