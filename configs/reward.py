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
from rlhf_jax.config import sections
from rlhf_jax.config import stage_sections
from rlhf_jax.config import util as config_util


def get_config(arg=None):
  arg = config_util.parse_arg(arg, size="small", steps=0, batch=32, seq_len=128,
                              data="rlhf_comparisons/round0", k=4, loss="",
                              model="")
  tiny = arg.size == "tiny"
  config = sections.run_config("reward", "reward", arg.size)
  if arg.model:  # the imported model's shape and its own tokenizer
    sections.use_pretrained_model(config, arg.model)
  config.init_from = ""  # an SFT run's checkpoints/ directory: trunk copied, head fresh
  # Where the score is read: "last" (the answer's last token) or "mean" (the head's mean over
  # the answer's own tokens; data.layout="shared_prompt" only). Recorded with the run, so PPO
  # and every evaluator read it the same way.
  config.score_pool = "last"
  config.data = stage_sections.comparison_data_section(
      arg.data, sections.batch_for(arg.size, arg.batch), min(arg.seq_len, config.model.max_len),
      max_answers=arg.k)
  config.loss = stage_sections.rm_loss_section(arg.loss)
  config.optim = sections.optim_section(
      learning_rate=1e-4 if arg.size in ("tiny", "small") else 9e-6, warmup_steps=10,
      weight_decay=0.0,
      # > 0: keep an exponential moving average of the params (optim.param_ema) and end the
      # run on it: the last checkpoint, the held-out metrics and the normalisation are the
      # average's.
      ema_decay=0.0)
  config.train = sections.epochs_train_section(arg.steps)
  config.eval = stage_sections.rm_eval_section(tiny)
  config.normalize = stage_sections.rm_normalize_section(tiny)
  return config
