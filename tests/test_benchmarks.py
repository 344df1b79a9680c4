"""The PPO benchmark's matmul floor runs the same arithmetic its FLOP count describes.

`benchmarks/ppo_iteration.py` reports each phase's projection matmuls timed alone (the floor no
implementation in the same forms can beat). Those shape lists must add up, with attention's
two matmuls counted by hand here, to the model FLOPs the benchmark divides by for MFU;
otherwise the floor and the MFU would describe different work.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import ppo_iteration  # noqa: E402

from rlhf_jax.models import model_config  # noqa: E402


@pytest.mark.parametrize("size,kv_heads", [("w1", None), ("tiny", None), ("tiny", 1)])
def test_phase_matmuls_add_up_to_the_model_flops(size, kv_heads):
  cfg = model_config(size, **({"n_kv_heads": kv_heads} if kv_heads else {}))
  batch, p, n, epochs, minibatches = 8, 5, 3, 2, 4
  s, L, hd = p + n, cfg.n_layers, cfg.n_heads * cfg.dim_per_head
  sets = ppo_iteration.phase_matmuls(cfg, batch, p, n, minibatches)

  def matmul_flops(phase, reps=1):
    return sum(reps * count * (3 if train else 1) * sum(2 * m * k * f for m, k, f in shapes)
               for count, train, shapes in sets[phase])

  # Attention's q.k and probs.v: 2 * 2 * s * H * Dh FLOPs per query row (over all s slots of
  # the sequence, the masked ones included, as flops_per_token counts them).
  attn_row = 4 * s * hd

  def attn(rows_per_layer):
    return attn_row * sum(rows_per_layer)

  trunk_read = [batch * s] * (L - 1) + [batch * n]  # policy / critic: answer columns last
  trunk_all = [batch * s] * L  # the RM reads the last token, so it runs every column
  expected = ppo_iteration.workload_flops(cfg, batch, p, n, epochs, recompute=False)
  assert matmul_flops("update", epochs) + epochs * 3 * 2 * attn(trunk_read) == expected["update"]
  assert matmul_flops("score") + attn(trunk_read) * 2 + attn(trunk_all) == expected["score"]
  # Generation's prefill reads one column per prompt, each decode step one row per sequence.
  gen_rows = [batch * p] * (L - 1) + [batch] + [batch] * L * (n - 1)
  assert matmul_flops("generate") + attn(gen_rows) == expected["generate"]
