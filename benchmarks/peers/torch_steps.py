"""W2 and W3 in a plain torch loop: the SFT step and the reward-model step that
benchmarks/train_step.py and benchmarks/reward_step.py are compared with.

The model is the W1 shape (Llama decoder, 4 layers, hidden 256, 4 heads, SwiGLU 1024, vocab
8192, untied embeddings; rlhf_jax/models/sizes.py's "w1") from `transformers`, random init,
float32, dropout 0, in the peers' own virtual environment. The loops are what a researcher
writes by hand, with no trainer around them:

  W2 (sft)  LlamaForCausalLM on 16 rows x 128 random tokens: next-token cross-entropy (the
            model's own `labels=` loss), backward, AdamW step, zero_grad(set_to_none).
  W3 (rm)   LlamaForSequenceClassification (num_labels=1: no vocabulary projection, a scalar
            head) on 16 pairs x 128 tokens, chosen and rejected rows in one batch of 32 (as
            TRL's RewardTrainer concatenates them): score at the last token, loss
            -log sigmoid(chosen - rejected), backward, AdamW step.

AdamW's hyperparameters are the project's defaults (b2 0.95, weight decay 0.1, gradient clip
1.0); they change no cost. Each step is timed in wall and process CPU seconds after two
warm-ups; the median is reported, with a square torch matmul before and after for context.

  benchmarks/peers/.venv/bin/python benchmarks/peers/torch_steps.py [--steps 10] [--threads N]
      [--json_out FILE]

Prints one JSON object, then a Markdown table. Timings are never asserted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402  (benchmarks/common.py: framework-free helpers)

# The same shape as trl_ppo.py's W1 and rlhf_jax/models/sizes.py's "w1".
W1_SHAPE = dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                tie_word_embeddings=False)
WORKLOADS = {"w2": {"step": "sft", "rows": 16, "seq_len": 128},
             "w3": {"step": "rm", "pairs": 16, "seq_len": 128}}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workloads", default="w2,w3", help="w2 (SFT step) and/or w3 (RM step)")
  p.add_argument("--steps", type=int, default=10, help="timed steps per workload (after 2 "
                                                       "warm-ups)")
  p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


def _config(torch, **extra):
  from transformers import LlamaConfig
  return LlamaConfig(**W1_SHAPE, attention_dropout=0.0, bos_token_id=None, eos_token_id=None,
                     **extra)


def _optimizer(torch, model):
  return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                           weight_decay=0.1)


def _update(torch, model, opt, loss) -> float:
  """backward, clip to norm 1, AdamW step, gradients dropped: what every step ends with."""
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  opt.step()
  opt.zero_grad(set_to_none=True)
  return float(loss)


def sft_step_fn(torch, rows: int, seq_len: int):
  """One W2 step as a no-argument callable: forward, loss, backward, clip, AdamW."""
  from transformers import LlamaForCausalLM
  model = LlamaForCausalLM(_config(torch, pad_token_id=None)).train()
  opt = _optimizer(torch, model)
  gen = torch.Generator().manual_seed(1)
  tokens = torch.randint(1, W1_SHAPE["vocab_size"], (rows, seq_len), generator=gen)

  def step():
    return _update(torch, model, opt, model(input_ids=tokens, labels=tokens).loss)
  return step


def rm_step_fn(torch, pairs: int, seq_len: int):
  """One W3 step: chosen and rejected rows as one batch, Bradley-Terry loss, AdamW."""
  from transformers import LlamaForSequenceClassification
  # pad_token_id only tells the head where each row ends; no row holds it (full-length rows).
  model = LlamaForSequenceClassification(
      _config(torch, num_labels=1, pad_token_id=W1_SHAPE["vocab_size"] - 1)).train()
  opt = _optimizer(torch, model)
  gen = torch.Generator().manual_seed(2)
  tokens = torch.randint(1, W1_SHAPE["vocab_size"] - 1, (2 * pairs, seq_len), generator=gen)
  mask = torch.ones_like(tokens)

  def step():
    scores = model(input_ids=tokens, attention_mask=mask).logits[:, 0]  # [2 * pairs]
    loss = -torch.nn.functional.logsigmoid(scores[:pairs] - scores[pairs:]).mean()
    return _update(torch, model, opt, loss)
  return step


def measure(torch, name: str, steps: int) -> dict:
  w = WORKLOADS[name]
  if w["step"] == "sft":
    step, rows = sft_step_fn(torch, w["rows"], w["seq_len"]), w["rows"]
  else:
    step, rows = rm_step_fn(torch, w["pairs"], w["seq_len"]), 2 * w["pairs"]
  for _ in range(2):
    step()
  wall, cpu = [], []
  for _ in range(steps):
    w0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    wall.append(time.perf_counter() - w0)
    cpu.append(time.process_time() - c0)
  s = statistics.median(wall)
  out = {"workload": name, "step": w["step"], "seq_len": w["seq_len"], "rows": rows,
         "step_s": s, "step_s_min": min(wall), "step_s_max": max(wall),
         "cpu_step_s": statistics.median(cpu), "tokens_per_s": rows * w["seq_len"] / s,
         "final_loss": loss, "all_step_s": wall}
  if w["step"] == "rm":
    out["pairs"] = w["pairs"]
    out["pairs_per_s"] = w["pairs"] / s
  return out


def main(argv=None):
  args = parse_args(argv)
  import torch
  import transformers
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  load_before = os.getloadavg()[0]
  peaks = [common.time_torch_matmul(torch, "float32")]
  results = [measure(torch, w.strip(), args.steps) for w in args.workloads.split(",") if w.strip()]
  peaks.append(common.time_torch_matmul(torch, "float32"))
  out = {"benchmark": "torch_steps", "shape": W1_SHAPE, "dtype": "float32",
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine": {**common.machine_info(),
                     "loadavg_1m_before_after": [load_before, os.getloadavg()[0]]},
         "versions": {"python": platform.python_version(), "torch": torch.__version__,
                      "transformers": transformers.__version__,
                      "torch_threads": torch.get_num_threads()},
         "matmul_peak_flops_per_s": max(peaks), "matmul_peak_readings": peaks,
         "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
         "results": results}
  print(json.dumps(out, indent=1))
  common.write_json(out, args.json_out)
  print()
  print(common.markdown_table(
      ["workload", "step", "rows x T", "step s (min-max)", "CPU-s", "tokens/s", "pairs/s"],
      [[r["workload"], r["step"], f"{r['rows']} x {r['seq_len']}",
        f"{r['step_s']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f})",
        f"{r['cpu_step_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
        f"{r['pairs_per_s']:.1f}" if "pairs_per_s" in r else ""] for r in results]))


if __name__ == "__main__":
  main()
