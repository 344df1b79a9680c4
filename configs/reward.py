r"""Reward model: the SFT trunk plus a scalar head, trained on rankings of K answers per prompt.

  python -m rlhf_jax.recipe.comparisons --sft=W/sft --config=round0 --data_dir=W/tfds   # the data
  python -m rlhf_jax.main --config=configs/reward.py:size=small,data=rlhf_comparisons/round0 \
      --config.init_from=W/sft/checkpoints --config.tokenizer.path=W/tokenizer/tokenizer.model \
      --config.data.data_dir=W/tfds --workdir=W/rm

Arguments: size, steps (0 = one pass over the data, InstructGPT's one epoch), batch (prompts
per step), seq_len (prompt + answer tokens), data (a TFDS name), k (most answers per prompt),
loss ('' = kwise for comparisons, binary for rlhf_feedback thumbs; see LOSSES in
rlhf_jax/train/reward.py), model ('' = a model of `size` with our sentencepiece tokenizer;
an imported model -- `smollm2_135m`, an HF directory or a .gguf -- whose shape and tokenizer the
SFT run of `init_from` used, e.g. configs/sft_hf.py's).

The run's workdir gets checkpoints/ ({'trunk', 'head'} params), normalization.json (gain and
bias so the SFT policy's answers score mean 0, std 1), metrics.jsonl with rm/* (train) and
eval/rm/* (held out, per language).
"""
import ml_collections

from rlhf_jax.config import util as config_util


def get_config(arg=None):
  arg = config_util.parse_arg(arg, size="small", steps=0, batch=32, seq_len=128,
                              data="rlhf_comparisons/round0", k=4, loss="",
                              model="")
  config = config_util.base_lm_config(arg)
  if arg.model:  # the imported model's shape and its own tokenizer
    config.model, config.tokenizer.path = config_util.pretrained_model_section(arg.model)
    config.tokenizer.vocab_size = config.model.vocab_size
  config.trainer = "reward"
  config.stage = "reward"
  config.init_from = ""  # an SFT run's checkpoints/ directory: trunk copied, head fresh

  tiny = arg.size == "tiny"
  config.data = ml_collections.ConfigDict(dict(
      name=arg.data,  # rlhf_comparisons/<config> (grades or rankings), or rlhf_feedback thumbs
      split="train", data_dir="",
      batch_size=8 if tiny else arg.batch,  # prompts (comparisons) per step
      seq_len=min(arg.seq_len, config.model.max_len),  # prompt + answer; prompts cut on the left
      max_answers=arg.k,  # K: batches are [B, K, T]; a record with more answers is an error
      epochs=1,  # used when train.steps = 0
  ))
  config.loss = ml_collections.ConfigDict(dict(
      name=arg.loss,  # kwise | grades | pairwise | binary; '' picks from the data
      margin=0.0,  # per grade step: a pair graded g apart must win by margin * g
  ))
  config.optim.learning_rate = 1e-4 if arg.size in ("tiny", "small") else 9e-6
  config.optim.warmup_steps = 10
  config.optim.weight_decay = 0.0
  # > 0: keep an exponential moving average of the params (optim.param_ema) and end the run on
  # it: the last checkpoint, the held-out metrics and the normalisation are the average's.
  config.optim.ema_decay = 0.0

  config.train.log_every = 10
  config.train.checkpoint_every = 200 if not arg.steps else max(arg.steps // 4, 1)
  if arg.steps:
    config.train.log_every = max(1, min(10, arg.steps // 10))

  config.eval = ml_collections.ConfigDict(dict(
      split="validation",  # '' = no held-out evaluation
      every=0,  # steps between evaluations (of the current iterate); 0 = only at the end
      max_comparisons=512 if not tiny else 64,
      batch_size=0,  # 0 = data.batch_size
      scorer="gold",  # gold scorer for accuracy against the noiseless ordering; '' = none
      bins=10,  # calibration bins
  ))
  config.normalize = ml_collections.ConfigDict(dict(
      enabled=True,
      source="auto",  # policy: sample the SFT (init_from) | responses: the data's answers
      num_prompts=256 if not tiny else 16,  # training prompts to answer
      max_new_tokens=48 if not tiny else 8,
      temperature=1.0, top_p=1.0,  # the SFT policy as PPO samples it
      batch_size=64 if not tiny else 8,
  ))
  return config
