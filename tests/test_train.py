"""The next-token train step: sharded = single device, accumulation = big batch, no retrace,
exact resume, SIGTERM, non-finite loss, and learning on a planted rule."""
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.core import optim, sharding
from rlhf_jax.data.synthetic import SyntheticLMIterator
from rlhf_jax.train import lm
from rlhf_jax.train.loop import NonFiniteLossError
from rlhf_jax.core import run_folder
from rlhf_jax.train.state import init_params_fn, create_train_state
from tests.helpers import flat_params, tiny_lm_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_steps(config, mesh_config, devices, n_steps=3, grad_accum=1):
  """Runs n_steps of the jitted step on a mesh; returns (losses, params, compiled count)."""
  mesh = sharding.make_mesh(mesh_config, devices)
  rules = sharding.axis_rules(None)
  model = lm.build_model(config, config.model.vocab_size)
  schedule = optim.make_schedule(config.optim, 10)
  tx = optim.make_optimizer(config.optim, 10)
  state, shardings = create_train_state(init_params_fn(model, config.data.seq_len), tx,
                                        mesh, rules, seed=0)
  data = SyntheticLMIterator(config.data.batch_size, config.data.seq_len,
                             config.model.vocab_size, seed=1)
  losses = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = lm.make_jitted_step(model, tx, schedule, grad_accum, shardings,
                               sharding.batch_sharding(mesh, rules))
    for _ in range(n_steps):
      batch = sharding.make_global_batch(next(data), mesh, rules)
      state, metrics = step(state, batch)
      losses.append(float(metrics["train/loss"]))
  return np.array(losses), flat_params(state.params), step._cache_size()


@pytest.fixture(scope="module")
def single_device_run():
  config = tiny_lm_config()
  return run_steps(config, {"data": 1}, jax.devices()[:1])


@pytest.mark.parametrize("mesh_config", [
    {"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 4, "tensor": 2}])
def test_sharded_step_matches_single_device(single_device_run, mesh_config):
  ref_losses, ref_params, _ = single_device_run
  losses, params, compiled = run_steps(tiny_lm_config(), mesh_config, jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for name in ref_params:
    # Adam divides by sqrt(v): summation-order noise in near-zero gradients moves an update by
    # at most ~lr, so compare to a few % of one step's size (lr = 1e-3).
    np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-4, atol=5e-5, err_msg=name)
  assert compiled == 1, "the train step was compiled more than once"


@pytest.mark.heavy  # bf16 x 8-device sharding; float32 sharding and bf16 steps are tested on their own
def test_bfloat16_sharded_step_matches_single_device_and_float32():
  """Mixed precision (bf16 operands, float32 accumulation: models/dot.py) under a 3-axis mesh:
  the same losses as on one device, compiled once, and within bf16 rounding of float32."""
  config = tiny_lm_config(**{"model.dtype": "bfloat16"})
  mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  one, _, _ = run_steps(config, {"data": 1}, jax.devices()[:1])
  sharded, params, compiled = run_steps(config, mesh, jax.devices())
  f32, f32_params, _ = run_steps(tiny_lm_config(), mesh, jax.devices())
  # Accumulation order differs across shards; bf16-rounded activations turn that into ~1e-3.
  np.testing.assert_allclose(sharded, one, rtol=5e-3)
  np.testing.assert_allclose(sharded, f32, rtol=2e-2)
  assert not np.array_equal(sharded, f32)  # bf16 really was used
  assert compiled == 1
  assert all(params[k].dtype == np.float32 for k in params)  # params stay float32
  assert params.keys() == f32_params.keys()


def test_params_are_sharded_as_the_rules_say():
  config = tiny_lm_config()
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  model = lm.build_model(config, 128)
  tx = optim.make_optimizer(config.optim, 10)
  state, _ = create_train_state(init_params_fn(model, 16), tx, mesh,
                                sharding.DEFAULT_AXIS_RULES, seed=0)
  up = state.params["layer_0"]["mlp"]["up"]["kernel"]  # ('embed', 'mlp') -> ('fsdp', 'tensor')
  assert up.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (64 // 4, 128 // 2)
  # Adam's first moment inherits the same layout.
  mu = state.opt_state[1][0].mu["layer_0"]["mlp"]["up"]["kernel"]
  assert mu.sharding.spec == up.sharding.spec


def test_embed_lr_multiplier_scales_only_the_embedding_updates():
  """optim.embed_lr_multiplier: the token embeddings (a trunk's under a scalar head too) step
  m times as far as plain AdamW would move them; every other parameter exactly as AdamW."""
  config = tiny_lm_config()
  config.optim.weight_decay = 0.1
  rng = np.random.default_rng(0)
  params = {"trunk": {"embed": {"embedding": rng.standard_normal((8, 4))},
                      "layer_0": {"kernel": rng.standard_normal((4, 4))}},
            "head": {"kernel": rng.standard_normal((4, 1)), "bias": np.zeros(1)}}
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape), params)
  plain = optim.make_optimizer(config.optim, 10)
  config.optim.embed_lr_multiplier = 7.0
  scaled = optim.make_optimizer(config.optim, 10)
  p_state, s_state = plain.init(params), scaled.init(params)
  for _ in range(3):  # past the warm-up's zero first step, with Adam's moments built up
    p_updates, p_state = plain.update(grads, p_state, params)
    s_updates, s_state = scaled.update(grads, s_state, params)
  p_flat, s_flat = flat_params(p_updates), flat_params(s_updates)
  assert any("embedding" in name for name in p_flat)
  for name in p_flat:
    factor = 7.0 if name.endswith("['embedding']") else 1.0
    assert np.abs(p_flat[name]).max() > 0, name
    np.testing.assert_allclose(s_flat[name], factor * p_flat[name], rtol=1e-6, err_msg=name)


def test_param_ema_is_the_debiased_average_of_the_iterates():
  """optim.param_ema after AdamW: the updates are AdamW's, unchanged, and ema_params is the
  average sum_k (1 - d) d^(n-k) p_k / (1 - d^n) of the params after each update (a numpy loop
  over the recorded iterates), blind to params replaced after init (an SFT trunk loaded into a
  freshly initialised state)."""
  config = tiny_lm_config()
  decay = 0.8
  rng = np.random.default_rng(0)
  params = {"a": rng.standard_normal((3, 4)).astype(np.float32),
            "b": {"c": rng.standard_normal(5).astype(np.float32)}}
  plain = optim.make_optimizer(config.optim, 20)
  averaged = optax.chain(optim.make_optimizer(config.optim, 20), optim.param_ema(decay))
  p_state = plain.init(params)
  a_state = averaged.init(jax.tree.map(np.zeros_like, params))  # init from other params
  np.testing.assert_array_equal(optim.ema_params(a_state, params)["a"], params["a"])
  iterates = []
  for _ in range(6):
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    p_updates, p_state = plain.update(grads, p_state, params)
    a_updates, a_state = averaged.update(grads, a_state, params)
    for x, y in zip(jax.tree.leaves(p_updates), jax.tree.leaves(a_updates)):
      np.testing.assert_array_equal(x, y)
    params = optax.apply_updates(params, p_updates)
    iterates.append(params)
  n = len(iterates)
  weights = np.array([(1 - decay) * decay ** (n - 1 - k) for k in range(n)]) / (1 - decay ** n)
  want = jax.tree.map(lambda *xs: sum(w * np.asarray(x, np.float64) for w, x in zip(weights, xs)),
                      *iterates)
  got = optim.ema_params(a_state, params)
  for name, value in flat_params(want).items():
    np.testing.assert_allclose(flat_params(got)[name], value, rtol=1e-5, atol=1e-6,
                               err_msg=name)
  with pytest.raises(ValueError, match="ema_decay=1.0 must be in"):
    optim.param_ema(1.0)
  with pytest.raises(ValueError, match="found 0"):
    optim.ema_params(p_state, params)


@pytest.mark.heavy  # a resumed EMA run; resume exactness is tested without EMA above
def test_param_ema_state_is_checkpointed_and_restored_exactly(tmp_path):
  """The moving average lives in the optimizer state: a checkpoint round trip (orbax, onto a
  freshly built sharded state) gives back every leaf of it, so a resumed RM run ends on the
  same average as an uninterrupted one."""
  config = tiny_lm_config()
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rules = sharding.axis_rules(None)
  model = lm.build_model(config, config.model.vocab_size)
  tx = optax.chain(optim.make_optimizer(config.optim, 10), optim.param_ema(0.9))

  def fresh():
    return create_train_state(init_params_fn(model, config.data.seq_len), tx, mesh, rules,
                              seed=0)[0]

  state = fresh()
  grads = jax.tree.map(lambda p: jax.numpy.full_like(p, 0.01), state.params)
  for _ in range(3):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(3, state.params, state.train_items(), {}, {})
  target = fresh()
  _, train, _, _ = ckpt.restore(3, target.params, target.train_items())
  ckpt.close()
  want = optim.ema_params(state.opt_state, state.params)
  got = optim.ema_params(train["opt_state"], state.params)
  for name, value in flat_params(want).items():
    assert np.abs(value - flat_params(target.params)[name]).max() > 0, name
    np.testing.assert_array_equal(flat_params(got)[name], value, err_msg=name)


def test_grad_accumulation_equals_one_big_batch(single_device_run):
  ref_losses, ref_params, _ = single_device_run
  losses, params, _ = run_steps(tiny_lm_config(), {"data": 1}, jax.devices()[:1], grad_accum=4)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for name in ref_params:
    np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-4, atol=5e-5, err_msg=name)


def _restore_params(workdir):
  return flat_params(ckpt_lib.read_params(os.path.join(workdir, "checkpoints")))


def test_resume_is_exact(tmp_path):
  # stop_after falls on a periodic checkpoint step: the forced save of the same step must be a
  # no-op, not orbax's StepAlreadyExistsError.
  config = tiny_lm_config(steps=6, **{"train.checkpoint_every": 3})
  lm.train(config, str(tmp_path / "straight"))
  straight = _restore_params(str(tmp_path / "straight"))

  interrupted = str(tmp_path / "interrupted")
  config.train.stop_after = 3
  out = lm.train(config, interrupted)
  assert ckpt_lib.Checkpointer(os.path.join(interrupted, "checkpoints")).latest_step() == 3
  config.train.stop_after = 0
  lm.train(config, interrupted)  # resumes at step 3: model, optimizer, rng and data position
  resumed = _restore_params(interrupted)
  for name in straight:
    np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # A huge learning rate without clipping blows the loss up within a few steps.
  config = tiny_lm_config(steps=40, **{"train.checkpoint_every": 1, "optim.grad_clip": 0.0,
                                       "optim.learning_rate": 1e9, "optim.warmup_steps": 0})
  config.optim.schedule = "constant"
  with pytest.raises(NonFiniteLossError, match=r"at step \d+") as err:
    lm.train(config, str(tmp_path))
  bad_step = int(str(err.value).split("at step ")[1].split(":")[0])
  kept = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step()
  assert kept is not None and kept < bad_step
  params = _restore_params(str(tmp_path))
  assert all(np.isfinite(v).all() for v in params.values())


def test_nan_learning_rate_never_leaves_a_nan_checkpoint(tmp_path):
  """Loss and gradient stay finite with a NaN learning rate, but the updated params do not:
  the run stops before it saves them, though the finite check otherwise runs a step late, and
  whatever it kept holds finite params. The schedule turns NaN only after its warm-up (a
  NaN peak times a zero warm-up fraction is NaN too, so the peak is finite and the decay's
  end is NaN), so steps 1-2 are good and saved."""
  config = tiny_lm_config(steps=6, **{"train.checkpoint_every": 1, "optim.warmup_steps": 2,
                                      "optim.end_lr_fraction": float("nan")})
  config.optim.schedule = "linear"
  config.train.log_every = 100  # the finite check runs one step late but before a save
  with pytest.raises(NonFiniteLossError, match=r"updated params are not finite\) at step 3"):
    lm.train(config, str(tmp_path))
  kept = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).latest_step()
  assert kept == 2
  assert all(np.isfinite(v).all() for v in _restore_params(str(tmp_path)).values())


def test_a_resumed_run_logs_each_step_once(tmp_path):
  """Steps logged after the last checkpoint are logged again on resume: metrics.jsonl keeps
  the resumed run's records only, so it reads as one uninterrupted run."""
  from rlhf_jax.core.metrics import read_metrics
  config = tiny_lm_config(steps=6, **{"train.checkpoint_every": 2})
  config.train.stop_after = 3  # checkpoints at 2 and (forced) 3
  lm.train(config, str(tmp_path))
  import shutil
  shutil.rmtree(os.path.join(tmp_path, "checkpoints", "3"))  # as if killed before step 3's save
  config.train.stop_after = 0
  lm.train(config, str(tmp_path))
  steps = [m["step"] for m in read_metrics(str(tmp_path))]
  assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]


def test_loss_falls_on_a_learnable_stream(tmp_path):
  config = tiny_lm_config(steps=60, **{"optim.learning_rate": 3e-3})
  lm.train(config, str(tmp_path))
  from rlhf_jax.core.metrics import read_metrics
  losses = [m["train/loss"] for m in read_metrics(str(tmp_path))]
  # Uniform guessing over 125 real tokens is log(125) = 4.83 nats; the rule is learnable.
  assert losses[0] > 4.0 and losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
  workdir = str(tmp_path)
  cmd = [sys.executable, "-m", "rlhf_jax.main",
         "--config=configs/pretrain.py:size=tiny,steps=100000,data=synthetic",
         f"--workdir={workdir}", "--config.train.checkpoint_every=100000",
         "--config.train.log_every=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics) and
                                        sum(1 for _ in open(metrics)) >= 3):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out.decode()[-2000:]
  step = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
  assert step is not None and step >= 3
  # The same command resumes from there (here: with a total that ends soon after).
  resumed = subprocess.run(cmd[:-2] + [f"--config.train.steps={step + 2}"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from" in resumed.stderr and f"at step {step}" in resumed.stderr
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == step + 2


def test_workdir_with_another_model_shape_is_a_clear_error(tmp_path):
  lm.train(tiny_lm_config(steps=2), str(tmp_path))
  wider = tiny_lm_config(steps=4)
  wider.model.d_ff = 256
  # The run folder's record says so before any checkpoint is opened, naming the field.
  with pytest.raises(run_folder.RunFolderError,
                     match=r"model\.d_ff: recorded 128, this run 256\): use a fresh workdir"):
    lm.train(wider, str(tmp_path))


def test_a_warm_up_over_half_the_run_is_reported(caplog):
  """A preset's 10 warm-up steps under a 12-step run (the real recipe's RM once) keep the rate
  below its peak for most of the run: make_optimizer says so, and keeps the config's value
  (the schedule at step 5 is still half the peak: linear warm-up 0 -> lr over 10 steps)."""
  config = tiny_lm_config()
  config.optim.warmup_steps = 10
  with caplog.at_level("WARNING", logger="rlhf_jax.core.optim"):
    optim.make_optimizer(config.optim, 12)
  assert "warmup_steps=10 is over half of this run's 12 steps" in caplog.text
  lr = config.optim.learning_rate
  np.testing.assert_allclose(float(optim.make_schedule(config.optim, 12)(5)), 0.5 * lr, rtol=1e-6)
  caplog.clear()
  with caplog.at_level("WARNING", logger="rlhf_jax.core.optim"):
    optim.make_optimizer(config.optim, 20)
  assert "warmup" not in caplog.text
