"""GAE and masked whitening against plain Python loops over ragged answers."""
import jax
import numpy as np
import pytest

from rlhf_jax.rl import gae


def _reference_gae(rewards, values, lengths, gamma, lam):
  """Textbook GAE, one row at a time, over the first `length` steps; 0 after."""
  b, n = rewards.shape
  adv = np.zeros((b, n))
  for i in range(b):
    last = 0.0
    for t in reversed(range(lengths[i])):
      next_value = values[i, t + 1] if t + 1 < lengths[i] else 0.0
      delta = rewards[i, t] + gamma * next_value - values[i, t]
      last = delta + gamma * lam * last
      adv[i, t] = last
  returns = adv + values * (np.arange(n)[None] < np.asarray(lengths)[:, None])
  return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_a_python_loop_on_ragged_rows(gamma, lam):
  rng = np.random.RandomState(0)
  b, n = 6, 9
  lengths = [9, 1, 4, 7, 2, 5]
  rewards = rng.normal(size=(b, n)).astype(np.float32)
  values = rng.normal(size=(b, n)).astype(np.float32)
  mask = (np.arange(n)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
  # Garbage on padding must not leak into real tokens.
  rewards_padded = np.where(mask > 0, rewards, 100.0).astype(np.float32)
  values_padded = np.where(mask > 0, values, -100.0).astype(np.float32)

  adv, ret = jax.jit(gae.compute_gae, static_argnums=(3, 4))(
      rewards_padded, values_padded, mask, gamma, lam)
  ref_adv, ref_ret = _reference_gae(rewards, values, lengths, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_whitening_is_mean_0_std_1_over_real_tokens_only():
  rng = np.random.RandomState(1)
  x = (3.0 + 2.0 * rng.normal(size=(5, 8))).astype(np.float32)
  lengths = [8, 1, 3, 6, 2]
  mask = (np.arange(8)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
  x = np.where(mask > 0, x, 50.0).astype(np.float32)  # padding far off: must be ignored
  out = np.asarray(gae.whiten(x, mask))
  real = out[mask > 0]
  assert abs(real.mean()) < 1e-5
  np.testing.assert_allclose(real.std(ddof=1), 1.0, rtol=1e-4)
  assert np.all(out[mask == 0] == 0)
  # The same numbers as whitening the real tokens alone.
  ref = (x[mask > 0] - x[mask > 0].mean()) / x[mask > 0].std(ddof=1)
  np.testing.assert_allclose(real, ref, rtol=1e-4, atol=1e-5)


def test_scale_only_whitening_keeps_the_mean():
  rng = np.random.RandomState(2)
  x = (1.5 + 4.0 * rng.normal(size=(4, 6))).astype(np.float32)
  mask = np.ones_like(x)
  mask[2, 3:] = 0
  out = np.asarray(gae.whiten(x, mask, shift_mean=False))
  real, src = out[mask > 0], x[mask > 0]
  np.testing.assert_allclose(real.std(ddof=1), 1.0, rtol=1e-4)
  np.testing.assert_allclose(real - real.mean(), (src - src.mean()) / src.std(ddof=1),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(real.mean(), src.mean(), rtol=1e-4)
