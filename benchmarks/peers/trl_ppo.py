"""The W1 or W4 PPO iteration in Hugging Face TRL (torch, CPU): the peer figure
ppo_iteration.py and lora_ppo.py are compared with.

`--workload w4` runs the same loop at SmolLM2-135M's shape (30 layers, d 576, 9 / 3 heads, MLP
1536, vocab 49,152, tied embeddings) on 16 prompts of 64 tokens, 64 sampled, 1 epoch x 2
minibatches: W4, as benchmarks/lora_ppo.py's full-parameter setting. The result also records the
process's peak RSS.

Runs in its own virtual environment (benchmarks/peers/setup.sh makes it: torch 2.13.0 CPU,
trl 1.9.0 and the transformers / accelerate / datasets versions pinned there), never in the
project's: the package does not depend on torch or TRL.

The workload is W1 of DESIGN.md, the same as benchmarks/ppo_iteration.py: policy, reference,
critic and reward model each a Llama decoder of 4 layers, hidden 256, 4 heads, SwiGLU 1024,
vocab 8192, untied embeddings (the critic and the RM as LlamaForSequenceClassification with
num_labels=1, so neither has a vocabulary projection, as on our side), random init, float32
params; 64 random prompts of 32 tokens; 48 sampled tokens each with no early stop; per-token
KL (k1), GAE (gamma 1, lambda 0.95); 4 epochs x 4 minibatches of 16, one optimizer step each.

No early stop: the policy has no EOS id (generation_config.eos_token_id = None, TRL's
stop_token None) and the tokenizer's pad id is 8192, one past the model's vocabulary, so no
sampled token is ever read as padding: every answer runs the full 48 tokens, on every side of
the comparison. Gradient checkpointing (TRL's default) is switched off: the model is tiny and
checkpointing only costs time; bf16 is off at float32 (TRL defaults it on).

Timing. TRL's `PPOTrainer.train()` is one loop, so the split comes from wrapping the module
functions it calls (nothing inside TRL is changed):
  generate  from the iteration's start to the return of `batch_generation` (the policy's
            `generate` with output scores; includes fetching the prompt batch);
  score     from there to the first `forward` call on the policy+value wrapper (ref forward,
            critic and RM `get_reward`, KL, rewards, GAE, whitening);
  update    from there to the `on_step_end` callback (4 x 4 forward/backward + AdamW steps,
            the metrics logging).
The three add up to the iteration; each is taken in wall seconds and in the process's CPU
seconds. The first iteration is a warm-up and is reported apart.
A square matmul in torch is timed before and after the iterations, for context (the faster of
the two readings, as in ppo_iteration.py).

  benchmarks/peers/.venv/bin/python benchmarks/peers/trl_ppo.py [--workload w1|w4] [--iterations 3]
      [--dtypes float32[,bfloat16]] [--threads N] [--json_out FILE]

Threads: torch's default is one intra-op thread per core. When other jobs keep the cores busy,
its OpenMP workers wait for each other at every small op: HF generate then burned 25
CPU-seconds with 2 threads against 3 with 1 (measured here at load 5-8). `--threads 1` gives
torch its best case on a loaded machine; on a quiet one the default should be the faster
(DESIGN.md's 14.6 s was taken with it). bfloat16 (`--dtypes bfloat16`, TRL's bf16 mixed
precision) is wired but was not measured here.

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
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402  (benchmarks/common.py: framework-free helpers)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workload", default="w1", choices=sorted(WORKLOADS),
                 help="w1: DESIGN.md's 8M-parameter workload; w4: the SmolLM2-135M shape")
  for name in ("prompts", "prompt_len", "new_tokens", "epochs", "minibatches"):
    p.add_argument(f"--{name}", type=int, default=None, help="default: the workload's")
  p.add_argument("--iterations", type=int, default=3, help="timed iterations (after 1 warm-up)")
  p.add_argument("--dtypes", default="float32",
                 help="float32 and/or bfloat16 (TRL's bf16 mixed precision: float32 params, "
                      "bf16 autocast)")
  p.add_argument("--threads", type=int, default=0,
                 help="torch intra-op threads; 0 keeps torch's default (one per core)")
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--matmul_repeats", type=int, default=10)
  p.add_argument("--json_out", default="")
  args = p.parse_args(argv)
  for name, value in WORKLOADS[args.workload]["sizes"].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


# W1 (DESIGN.md): the same shape as rlhf_jax/models/sizes.py's "w1". W4: SmolLM2-135M's
# shape (sizes.py's "135m": 30 layers, d 576, 9 query / 3 key-value heads, MLP 1536, vocab
# 49,152, tied), the batch of benchmarks/lora_ppo.py and `ppo_iteration.py --size 135m`.
WORKLOADS = {
    "w1": {"shape": dict(vocab_size=8192, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False),
           "sizes": dict(prompts=64, prompt_len=32, new_tokens=48, epochs=4, minibatches=4)},
    "w4": {"shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=2048, tie_word_embeddings=True),
           "sizes": dict(prompts=16, prompt_len=64, new_tokens=64, epochs=1, minibatches=2)},
}


def build_tokenizer(vocab_size: int):
  """A word-level tokenizer over ids 0..vocab-1 plus a pad token at id `vocab_size`.

  The prompts are token ids already; TRL only needs the tokenizer for padding (its collator)
  and for its pad / EOS ids. The pad id lies outside the model's vocabulary so a sampled token
  is never mistaken for padding (TRL masks by `token == pad_token_id`).
  """
  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast
  vocab = {f"t{i}": i for i in range(vocab_size)}
  vocab["<pad>"] = vocab_size
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<pad>")


def build_models(torch, shape: dict, seed: int):
  """(policy, reference, critic, reward model): random init, float32, dropout 0, no EOS."""
  from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
  torch.manual_seed(seed)
  lm_config = LlamaConfig(**shape, attention_dropout=0.0, bos_token_id=None, eos_token_id=None,
                          pad_token_id=None)
  policy = LlamaForCausalLM(lm_config)
  reference = LlamaForCausalLM(lm_config)
  reference.load_state_dict(policy.state_dict())  # the SFT policy, frozen
  cls_config = LlamaConfig(**shape, num_labels=1, attention_dropout=0.0, bos_token_id=None,
                           eos_token_id=None, pad_token_id=shape["vocab_size"] - 1)
  critic = LlamaForSequenceClassification(cls_config)
  reward = LlamaForSequenceClassification(cls_config)
  for model in (policy, reference):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
  return policy, reference, critic, reward


class PhaseClock:
  """Marks per iteration from wrappers around TRL's module functions: wall seconds, and the
  process's CPU seconds (all threads), which a loaded machine disturbs less than wall time."""

  def __init__(self):
    self.marks = {}
    self.splits = []  # one {"generate", "score", "update"} per iteration, wall seconds
    self.cpu_splits = []  # the same in CPU seconds

  @staticmethod
  def now():
    return time.perf_counter(), time.process_time()

  def mark(self, name: str, first_only: bool = False):
    if not (first_only and name in self.marks):
      self.marks[name] = self.now()

  def start(self):
    self.marks = {"start": self.now()}

  def end(self):
    m = {**self.marks, "end": self.now()}
    bounds = [("generate", "start", "generated"), ("score", "generated", "update"),
              ("update", "update", "end")]
    for i, out in ((0, self.splits), (1, self.cpu_splits)):
      out.append({k: m[b][i] - m[a][i] for k, a, b in bounds})
    self.start()


def install_clock(ppo_module, clock: PhaseClock):
  """Wraps batch_generation and forward in TRL's ppo_trainer module (names it calls at run
  time), and returns a TrainerCallback that closes each iteration at on_step_end."""
  from transformers import TrainerCallback
  original_generation = ppo_module.batch_generation
  original_forward = ppo_module.forward
  wrapper_type = ppo_module.PolicyAndValueWrapper

  def batch_generation(*a, **k):
    out = original_generation(*a, **k)
    clock.mark("generated")
    return out

  def forward(model, *a, **k):
    if isinstance(model, wrapper_type):
      clock.mark("update", first_only=True)
    return original_forward(model, *a, **k)

  ppo_module.batch_generation = batch_generation
  ppo_module.forward = forward

  class Clock(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
      clock.start()

    def on_step_end(self, args, state, control, **kwargs):
      clock.end()
  return Clock()


def run_dtype(args, dtype: str, torch) -> dict:
  from datasets import Dataset
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  from trl.experimental.ppo import ppo_trainer as ppo_module

  shape = WORKLOADS[args.workload]["shape"]
  rng = torch.Generator().manual_seed(2)
  prompts = torch.randint(4, shape["vocab_size"], (args.prompts, args.prompt_len), generator=rng)
  dataset = Dataset.from_dict({"input_ids": prompts.tolist()})
  tokenizer = build_tokenizer(shape["vocab_size"])
  policy, reference, critic, reward = build_models(torch, shape, 0)

  clock = PhaseClock()
  callback = install_clock(ppo_module, clock)
  with tempfile.TemporaryDirectory() as out_dir:
    config = PPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, seed=0,
        bf16=dtype == "bfloat16", fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=args.prompts, gradient_accumulation_steps=1,
        num_mini_batches=args.minibatches, num_ppo_epochs=args.epochs,
        local_rollout_forward_batch_size=args.prompts,
        total_episodes=args.prompts * (args.iterations + 1),
        response_length=args.new_tokens, temperature=1.0, stop_token=None,
        missing_eos_penalty=None, num_sample_generations=0, kl_coef=0.05, kl_estimator="k1",
        gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
        learning_rate=1e-5, dataloader_num_workers=0)
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy,
                         ref_model=reference, reward_model=reward, value_model=critic,
                         train_dataset=dataset, eval_dataset=None, callbacks=[callback])
    peaks = [common.time_torch_matmul(torch, dtype, args.matmul_n, args.matmul_repeats)]
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      trainer.train()
    peaks.append(common.time_torch_matmul(torch, dtype, args.matmul_n, args.matmul_repeats))

  if len(clock.splits) != args.iterations + 1:
    raise RuntimeError(f"expected {args.iterations + 1} PPO iterations, timed "
                       f"{len(clock.splits)}: TRL's loop changed?")
  def summary(splits):
    timed = splits[1:]
    med = {k: statistics.median(s[k] for s in timed) for k in timed[0]}
    return med, statistics.median(sum(s.values()) for s in timed), timed

  med, iteration, timed = summary(clock.splits)
  cpu_med, cpu_iteration, cpu_timed = summary(clock.cpu_splits)
  return {
      "dtype": dtype,
      "iteration_s": iteration,
      "episodes_per_s": args.prompts / iteration,
      "seconds": med,
      "fraction": {k: v / iteration for k, v in med.items()},
      "first_iteration_s": clock.splits[0],
      "all_seconds": {k: [s[k] for s in timed] for k in med},
      "cpu_iteration_s": cpu_iteration,
      "cpu_seconds": cpu_med,
      "all_cpu_seconds": {k: [s[k] for s in cpu_timed] for k in cpu_med},
      "matmul_peak_flops_per_s": max(peaks),
      "matmul_peak_readings": peaks,
      # The process's peak so far (Linux: KiB): this dtype's alone when it runs first or alone.
      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
  }


def main(argv=None):
  args = parse_args(argv)
  import accelerate
  import torch
  import transformers
  import trl
  if args.threads:
    torch.set_num_threads(args.threads)
  load_before = os.getloadavg()[0]
  results = [run_dtype(args, d.strip(), torch) for d in args.dtypes.split(",") if d.strip()]
  out = {
      "benchmark": "trl_ppo",
      "workload": {"name": args.workload, "prompts": args.prompts, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "epochs": args.epochs,
                   "minibatches": args.minibatches, "early_stop": False},
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": {**common.machine_info(), "loadavg_1m_before_after":
                  [load_before, os.getloadavg()[0]]},
      "versions": {"python": platform.python_version(), "torch": torch.__version__,
                   "trl": trl.__version__, "transformers": transformers.__version__,
                   "accelerate": accelerate.__version__, "torch_threads": torch.get_num_threads()},
      "results": results,
  }
  print(json.dumps(out, indent=1))
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(out, f, indent=1)
  print()
  print(common.markdown_table(
      ["framework", "dtype", "iteration s", "episodes/s", "generate s (%)", "score s (%)",
       "update s (%)", "iteration CPU-s", "peak RSS GiB", "torch matmul peak GFLOP/s"],
      [[f"TRL {trl.__version__} / torch {torch.__version__}", r["dtype"],
        f"{r['iteration_s']:.2f}", f"{r['episodes_per_s']:.1f}",
        *(f"{r['seconds'][k]:.2f} ({100 * r['fraction'][k]:.0f}%)"
          for k in ("generate", "score", "update")),
        f"{r['cpu_iteration_s']:.1f}", f"{r['peak_rss_gib']:.2f}",
        f"{r['matmul_peak_flops_per_s'] / 1e9:.0f}"] for r in results]))


if __name__ == "__main__":
  main()
