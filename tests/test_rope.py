"""models/rope.py: cos / sin from the digit tables, and the rotation, against numpy in float64."""
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import rope
from rlhf_jax.models.model_config import ModelConfig, rope_frequencies


def _freqs(theta=10000.0, head_dim=64):
  return rope_frequencies(ModelConfig(d_model=head_dim, n_heads=1, n_kv_heads=1,
                                      rope_theta=theta))


def test_rotation_is_the_float64_cos_and_sin_at_every_digit_boundary():
  f = _freqs(1e6, 64)
  # every level's carries, the largest position, and random ones
  edges = [0, 1, 127, 128, 129, 16383, 16384, 16385, 131071, 1_000_003, rope.MAX_POSITION - 1]
  rand = np.random.default_rng(0).integers(0, rope.MAX_POSITION, 53).tolist()
  p = np.asarray(edges + rand, np.int64).reshape(2, -1)  # [B, T]
  cos, sin = jax.jit(lambda q: rope.rotation(q, f))(jnp.asarray(p))  # f: host values
  angles = p[..., None].astype(np.float64) * f.astype(np.float64)  # the exact angles
  # float32 rounding of three table entries and two angle additions: a few 1e-7
  np.testing.assert_allclose(np.asarray(cos), np.cos(angles), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sin), np.sin(angles), rtol=0, atol=1e-6)
  # what it replaced, cos(float32(p * f)), is off by far more at large positions
  f32 = np.cos((p[..., None].astype(np.float32) * f).astype(np.float32))
  assert np.abs(f32 - np.cos(angles)).max() > 1e-3


def _rotate_numpy(x, p, f, sign=1.0):
  a = sign * p[..., None, None].astype(np.float64) * f  # [B, T, 1, Dh/2]
  x1, x2 = np.split(x.astype(np.float64), 2, axis=-1)
  return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], -1)


def test_rotary_rotates_pairs_i_and_i_plus_half_and_its_gradient_rotates_back():
  rng = np.random.default_rng(1)
  f = _freqs(10000.0, 16)
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)  # [B, T, H, Dh]
  p = rng.integers(0, 700, (2, 5))
  out = rope.rotary(jnp.asarray(x), *rope.rotation(jnp.asarray(p), f))
  np.testing.assert_allclose(np.asarray(out), _rotate_numpy(x, p, f), rtol=1e-5, atol=1e-5)
  # the rotation is orthogonal: the gradient of <w, R x> is R^T w, a rotation by -angle
  w = rng.standard_normal(x.shape).astype(np.float32)
  grad = jax.grad(lambda v: jnp.sum(jnp.asarray(w) * rope.rotary(
      v, *rope.rotation(jnp.asarray(p), f))))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(grad), _rotate_numpy(w, p, f, -1.0), rtol=1e-5,
                             atol=1e-5)
  # bfloat16 inputs come back in bfloat16, rotated in float32
  assert rope.rotary(jnp.asarray(x, jnp.bfloat16), *rope.rotation(jnp.asarray(p), f)).dtype \
      == jnp.bfloat16
