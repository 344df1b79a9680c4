r"""The recipe on the bundled data, start to finish: `make demo` runs this.

  python -m rlhf_jax.demo --workdir=workdirs/demo [--size=small]

Stages, each in its own subdirectory of the workdir, each skipped when already finished and
resumed when interrupted (re-running the command is always safe):
  tokenizer  sentencepiece on English + Chinese text
  pretrain   next-token training on packed text         (configs/pretrain.py)
  sft        assistant-only loss on dialogues            (configs/sft.py)
  samples    the SFT model's answers to a few prompts in each language, printed and saved
"""
from __future__ import annotations

import json
import logging
import os
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "Where every stage writes.")
_SIZE = flags.DEFINE_string("size", "small", "Model size (rlhf_jax/models/sizes.py).")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 0, "0: the config's default.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", 0, "0: the config's default.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data dir ('' = ~/.cache/rlhf_jax/tfds).")

log = logging.getLogger("rlhf_jax.demo")

SAMPLE_PROMPTS = {
    "en": ["Hi! How are you doing today?", "What do you like to do on weekends?",
           "Do you have any pets?", "What is your favorite food?"],
    "zh": ["你好，你今天过得怎么样？", "你喜欢做什么运动？", "你最喜欢吃什么？",
           "这个手机质量怎么样？"],
}


def stage_config(name: str, size: str, workdir: str, steps: int, data_dir: str = ""):
  from rlhf_jax import config_util
  arg = f"size={size}" + (f",steps={steps}" if steps else "")
  config = config_util.load_config(f"configs/{name}.py:{arg}")
  with config.unlocked():
    config.tokenizer.path = os.path.join(workdir, "tokenizer", "tokenizer.model")
    config.data.data_dir = data_dir
    if name == "sft":
      config.init_from = os.path.join(workdir, "pretrain", "checkpoints")
  return config


def _finished(stage_dir: str, steps: int) -> bool:
  from rlhf_jax.checkpoint import Checkpointer
  directory = os.path.join(stage_dir, "checkpoints")
  return os.path.isdir(directory) and Checkpointer(directory).latest_step() == steps


def run_stage(name: str, config, workdir: str) -> None:
  from rlhf_jax import launch
  stage_dir = os.path.join(workdir, name)
  if _finished(stage_dir, config.train.steps):
    print(f"[{name}] already finished: skipped")
    return
  start = time.time()
  metrics = launch.run(config, stage_dir)
  print(f"[{name}] done in {time.time() - start:.0f}s, loss {metrics.get('train/loss', 0):.3f}")


def train_tokenizer(workdir: str, config) -> None:
  from rlhf_jax import tokenizer as tok_lib
  from rlhf_jax.trainers.inputs import tokenizer_corpus
  path = config.tokenizer.path
  if os.path.exists(path):
    print("[tokenizer] already trained: skipped")
    return
  start = time.time()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tok_lib.train_tokenizer(tokenizer_corpus(), path[:-len(".model")], config.tokenizer.vocab_size,
                          character_coverage=config.tokenizer.character_coverage)
  print(f"[tokenizer] {config.tokenizer.vocab_size} pieces in {time.time() - start:.0f}s")


def sample_answers(workdir: str, config) -> dict:
  import jax
  from rlhf_jax import checkpoint, respond, tokenizer as tok_lib
  from rlhf_jax.trainers.lm import build_model
  tokenizer = tok_lib.Tokenizer.load(config.tokenizer.path)
  model = build_model(config, tokenizer.vocab_size)
  params = checkpoint.read_params(os.path.join(workdir, "sft", "checkpoints"))
  out = {}
  for lang, prompts in SAMPLE_PROMPTS.items():
    answers = respond.answer(params, model.config, tokenizer, prompts, rng=jax.random.key(0))
    out[lang] = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]
    for p, a in zip(prompts, answers):
      print(f"  [{lang}] user: {p}\n       assistant: {a}")
  with open(os.path.join(workdir, "samples.json"), "w") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
  return out


def run_demo(workdir: str, size: str = "small", pretrain_steps: int = 0, sft_steps: int = 0,
             data_dir: str = ""):
  pretrain = stage_config("pretrain", size, workdir, pretrain_steps, data_dir)
  sft = stage_config("sft", size, workdir, sft_steps, data_dir)
  train_tokenizer(workdir, pretrain)
  run_stage("pretrain", pretrain, workdir)
  run_stage("sft", sft, workdir)
  print("[samples] answers of the SFT model:")
  return sample_answers(workdir, sft)


def main(argv):
  del argv
  from rlhf_jax.launch import setup_logging
  setup_logging()
  run_demo(_WORKDIR.value, _SIZE.value, _PRETRAIN_STEPS.value, _SFT_STEPS.value, _DATA_DIR.value)


if __name__ == "__main__":
  app.run(main)
