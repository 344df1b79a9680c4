"""The RM as a function: padding invariance, one forward pass per answer, the K-wise loss from one
score per answer, loading a trained RM, and initialisation from an SFT checkpoint."""
import functools
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.models import losses
from rlhf_jax.infer import rm_scores as reward
from rlhf_jax.core import sharding
from rlhf_jax.models import ScalarModel, Transformer, model_config
from rlhf_jax.models.transformer import positions_from_mask
from rlhf_jax.train import reward as rm_trainer

V = 97
CFG = model_config("tiny", vocab_size=V, max_len=64)


def init_params(module, seed=0):
  """Params of the module's own tree drawn in numpy: no init to compile."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), tokens, tokens, tokens))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "embedding" in name:
      x = rng.normal(0.0, 1.0, leaf.shape)
    elif "scale" in name:
      x = 1.0 + 0.1 * rng.normal(size=leaf.shape)
    elif "bias" in name:
      x = np.zeros(leaf.shape)
    else:
      x = rng.normal(0.0, leaf.shape[0] ** -0.5, leaf.shape)
    return jnp.asarray(x, jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@pytest.fixture(scope="module")
def rm_params():
  params = init_params(ScalarModel(CFG))
  params["head"]["dense"]["kernel"] = params["head"]["dense"]["kernel"] * 10.0
  return params


_score = jax.jit(functools.partial(reward.score_sequences, model_config=CFG))
ROWS, WIDTH = 5, 40  # every scoring call below has this shape: one compilation


def score(params, tokens, mask, gain=1.0, bias=0.0):
  assert tokens.shape == (ROWS, WIDTH)
  mask = jnp.asarray(mask)
  return _score(params, jnp.asarray(tokens), positions_from_mask(mask), mask, mask,
                gain=jnp.float32(gain), bias=jnp.float32(bias))


def test_score_is_invariant_to_left_and_right_padding(rm_params):
  row = np.random.default_rng(0).integers(2, V, 11).astype(np.int32)
  tokens = np.zeros((ROWS, WIDTH), np.int32)
  mask = np.zeros((ROWS, WIDTH), np.int32)
  for r, left in enumerate([0, 29, 13, 5, 20]):  # right padding: whatever is left of WIDTH
    tokens[r, left:left + len(row)] = row
    mask[r, left:left + len(row)] = 1
  scores = np.asarray(score(rm_params, tokens, mask))
  np.testing.assert_allclose(scores, scores[0], rtol=1e-5, atol=1e-5)
  # ... and it is the value at the last real token: changing that token changes the score.
  tokens[1, 29 + len(row) - 1] = (row[-1] + 1) % V
  assert abs(float(score(rm_params, tokens, mask)[1]) - scores[0]) > 1e-4


def test_gain_and_bias_are_applied(rm_params):
  tokens = np.random.default_rng(1).integers(2, V, (ROWS, WIDTH)).astype(np.int32)
  mask = np.ones_like(tokens)
  raw = np.asarray(score(rm_params, tokens, mask))
  np.testing.assert_allclose(np.asarray(score(rm_params, tokens, mask, 2.5, -1.0)),
                             2.5 * raw - 1.0, rtol=1e-5, atol=1e-5)


def kwise_batch(b, k, t, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, t + 1, (b, k))
  tokens = rng.integers(2, V, (b, k, t)).astype(np.int32)
  seg = (np.arange(t)[None, None] < lengths[..., None]).astype(np.int32)
  tokens = tokens * seg
  positions = np.maximum(np.cumsum(seg, -1) - 1, 0).astype(np.int32)
  grades = rng.integers(0, 3, (b, k))
  return {"tokens": tokens, "positions": positions, "segment_ids": seg,
          "valid": np.ones((b, k), np.float32),
          "prefer": (grades[:, :, None] < grades[:, None, :]).astype(np.float32),
          "margin": np.zeros((b, k, k), np.float32)}


def test_kwise_runs_one_forward_pass_per_answer(rm_params, monkeypatch):
  b, k, t = 3, 4, 16
  batch = kwise_batch(b, k, t)
  model = ScalarModel(CFG)
  calls = []
  original = ScalarModel.__call__

  def counting(self, tokens, positions, segment_ids, **kwargs):
    calls.append(tokens.shape)
    return original(self, tokens, positions, segment_ids, **kwargs)

  monkeypatch.setattr(ScalarModel, "__call__", counting)
  loss_fn = jax.jit(lambda p, bt: rm_trainer.rm_loss(p, bt, model=model, kind="ranking",
                                                     reduction="prompt")[0])
  lowered = loss_fn.lower(rm_params, batch)
  assert calls == [(b * k, t)], "the model must see each answer once: B*K rows, one call"
  monkeypatch.setattr(ScalarModel, "__call__", original)

  # FLOPs: the K-wise loss costs what scoring its B*K rows costs; scoring the two answers of
  # each of the C(4, 2) = 6 pairs on their own would cost 2 * 6 / 4 = 3 times as much. (Each
  # row's last layer runs at its scored token only, here the last column.)
  kwise_flops = lowered.cost_analysis()["flops"]
  one_pass = jax.jit(lambda p, x, s: model.apply({"params": p}, x, x, s, columns=jnp.full(
      (x.shape[0], 1), t - 1)))
  rows = one_pass.lower(rm_params, jnp.zeros((b * k, t), jnp.int32),
                        jnp.ones((b * k, t), jnp.int32)).cost_analysis()["flops"]
  pairs = one_pass.lower(rm_params, jnp.zeros((b * 2 * 6, t), jnp.int32),
                         jnp.ones((b * 2 * 6, t), jnp.int32)).cost_analysis()["flops"]
  assert abs(kwise_flops - rows) / rows < 0.02, (kwise_flops, rows)
  assert kwise_flops < 0.4 * pairs


def test_rm_run_ends_on_the_moving_average_of_its_iterates(rm_params):
  """With ema_decay the RM's steps are the plain ones until the last, whose params are the
  debiased average of every post-update iterate (the params of a run without the average,
  averaged in numpy); the optimizer state moves on identically."""
  import optax
  from rlhf_jax.core import optim
  from rlhf_jax.train.state import TrainState
  optim_config = config_util_optim()
  optim_config.warmup_steps, optim_config.learning_rate = 0, 1e-2  # steps that move the params
  steps, decay = 3, 0.6
  batch = {**kwise_batch(2, 4, 12, seed=3), "label": np.zeros((2, 4), np.float32),
           "labeled": np.zeros((2, 4), np.float32), "lang": np.array([0, 1], np.int32)}
  model = ScalarModel(CFG)

  def run(tx, end_at):
    step = jax.jit(functools.partial(
        rm_trainer.train_step, model=model, tx=tx, schedule=optim.make_schedule(optim_config,
                                                                                steps),
        kind="ranking", reduction="prompt", end_on_average_at=end_at))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=rm_params,
                       opt_state=tx.init(rm_params), rng=jnp.zeros((2,), jnp.uint32))
    out = []
    for _ in range(steps):
      state, _ = step(state, batch)
      out.append(state.params)
    return out, state

  plain_tx = optim.make_optimizer(optim_config, steps)
  plain, _ = run(plain_tx, 0)
  averaged, state = run(optax.chain(plain_tx, optim.param_ema(decay)), steps)
  # Two compiled programs (with and without the average) round alike only on some CPUs and
  # XLA settings: the plain steps agree to float32 rounding, relative to how far they moved.
  for k in range(steps - 1):
    diff = optax.global_norm(jax.tree.map(jnp.subtract, averaged[k], plain[k]))
    moved_k = optax.global_norm(jax.tree.map(jnp.subtract, plain[k], rm_params))
    assert float(diff) < 1e-4 * float(moved_k), (k, float(diff), float(moved_k))
  w = np.array([(1 - decay) * decay ** (steps - 1 - k) for k in range(steps)])
  w /= 1 - decay ** steps
  want = jax.tree.map(lambda *xs: sum(c * np.asarray(x, np.float64) for c, x in zip(w, xs)),
                      *plain)
  # Relative to the distance from the start, over all leaves (Adam's step on a near-zero
  # gradient amplifies a rounding difference in one element to ~1e-4 of the step).
  norm = lambda a, b: float(optax.global_norm(jax.tree.map(
      lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)))
  assert norm(averaged[-1], want) < 1e-4 * norm(want, rm_params)
  # The average is not the last iterate: the check can fail.
  assert norm(plain[-1], want) > 1e-2 * norm(want, rm_params)
  assert int(state.step) == steps


def config_util_optim():
  from rlhf_jax.config import util as config_util
  return config_util.load_config("configs/reward.py:size=tiny").optim


def test_kwise_loss_equals_mean_over_pairs_scored_separately(rm_params):
  """The K-wise loss from one score per answer = the mean, per prompt, of pairwise losses
  where each pair's two answers are scored on their own."""
  b, k, t = 3, 4, 16
  batch = kwise_batch(b, k, t, seed=3)
  model = ScalarModel(CFG)
  loss_sum, (count, _) = jax.jit(functools.partial(
      rm_trainer.rm_loss, model=model, kind="ranking", reduction="prompt"))(rm_params, batch)
  pairs = [(n, i, j) for n in range(b) for i, j in itertools.permutations(range(k), 2)
           if batch["prefer"][n, i, j]]
  # Every pair as its own two-row batch, all in one call: rows (2p, 2p + 1) = (better, worse).
  rows = {key: np.stack([batch[key][n, a] for n, i, j in pairs for a in (i, j)])
          for key in ("tokens", "positions", "segment_ids")}
  s = np.asarray(jax.jit(functools.partial(reward.score_sequences, model_config=CFG))(
      rm_params, rows["tokens"], rows["positions"], rows["segment_ids"], rows["segment_ids"]))
  per_prompt = {}
  for p, (n, _, _) in enumerate(pairs):
    pl, _ = losses.bradley_terry_loss(s[2 * p:2 * p + 1], s[2 * p + 1:2 * p + 2])
    per_prompt.setdefault(n, []).append(float(pl))
  assert float(count) == len(per_prompt)
  np.testing.assert_allclose(float(loss_sum / count),
                             np.mean([np.mean(v) for v in per_prompt.values()]), rtol=1e-4)


def save_run(directory, params, config):
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  ckpt.save(1, params, {"step": jnp.ones((), jnp.int32)}, {}, config)
  ckpt.close()


def test_load_reward_model_round_trip(tmp_path, rm_params):
  from helpers import write_run
  workdir = str(tmp_path)
  # The shape comes from the run's record, not from its saved config (which claims another).
  write_run(workdir, rm_params, CFG, "", kind="scalar", saved={"model": {"vocab_size": 8192}})
  with pytest.raises(FileNotFoundError, match="normalization.json"):
    reward.load_reward_model(workdir)
  reward.write_normalization(workdir, reward.fit_normalization([1.0, 2.0, 4.0, 7.0]))
  with open(os.path.join(workdir, reward.NORMALIZATION_FILE)) as f:
    assert set(json.load(f)) == {"gain", "bias", "mean_raw", "std_raw", "n"}
  cfg, params, gain, bias = reward.load_reward_model(workdir)
  assert cfg.vocab_size == V and cfg.d_model == CFG.d_model
  assert set(params) == {"trunk", "head"}
  np.testing.assert_allclose(gain * np.array([1.0, 2.0, 4.0, 7.0]) + bias,
                             (np.array([1.0, 2.0, 4.0, 7.0]) - 3.5) / np.std([1, 2, 4, 7]),
                             rtol=1e-6)
  assert cfg == CFG
  tokens = np.random.default_rng(2).integers(2, V, (ROWS, WIDTH)).astype(np.int32)
  mask = np.ones_like(tokens)
  np.testing.assert_allclose(np.asarray(score(params, tokens, mask, gain, bias)),
                             gain * np.asarray(score(rm_params, tokens, mask)) + bias,
                             rtol=1e-5, atol=1e-5)


def test_normalization_of_a_constant_is_an_error():
  with pytest.raises(ValueError, match="same score"):
    reward.fit_normalization([0.5, 0.5, 0.5])


def test_trunk_is_copied_from_sft_and_a_wrong_shape_names_both(tmp_path):
  sft_params = init_params(Transformer(CFG), seed=4)
  sft_dir = str(tmp_path / "sft" / "checkpoints")
  save_run(sft_dir, sft_params, {})
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rules = sharding.axis_rules(None)
  trunk = rm_trainer.trunk_of(rm_trainer.restore_policy(sft_dir, CFG, mesh, rules, 8))
  assert set(trunk) == set(sft_params) - {"lm_head"}
  for a, b in zip(jax.tree.leaves(trunk), jax.tree.leaves({k: sft_params[k] for k in trunk})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  other = model_config("tiny", vocab_size=V, max_len=64, d_model=32, n_heads=2, n_kv_heads=2)
  with pytest.raises(ckpt_lib.CheckpointShapeError,
                     match=r"embed/embedding: checkpoint \(97, 64\), model \(97, 32\)"):
    rm_trainer.restore_policy(sft_dir, other, mesh, rules, 8)
