r"""PPO against the reward model, with a per-token KL penalty to the SFT policy.

  python -m rlhf_jax.main --config=configs/ppo.py:size=small,lang=both,sft=W/sft,rm=W/rm \
      --workdir=W/ppo

`sft` and `rm` are the workdirs of an SFT run and a reward-model run. The policy and the frozen
reference start from the SFT checkpoint (its shape wins over `model.*`; `model.dtype` and
`model.remat` still apply), the critic and the frozen reward model from the RM checkpoint and
its normalization.json. Without them every model starts random (with a warning): only for
tests and speed runs.

`lang=en|zh|both`: which prompts to train on (`both` gives every batch half of each).
`model=smollm2_135m` (or an HF directory / .gguf): SFT and RM runs of an imported model; the
tokenizer is that model's own.
"""
from rlhf_jax.config import sections
from rlhf_jax.config import stage_sections
from rlhf_jax.config import util as config_util


def get_config(arg=None):
  arg = config_util.parse_arg(arg, size="small", lang="both", steps=200, batch=64, sft="", rm="",
                              model="")
  tiny = arg.size == "tiny"
  config = sections.run_config("ppo", "ppo", arg.size)
  config.sft_dir = arg.sft  # an SFT workdir (its checkpoints/ and tokenizer); "" = random
  config.rm_dir = arg.rm  # a reward-model workdir (checkpoints/, normalization.json); "" = random
  if arg.model:  # an imported model: its own tokenizer (the shapes come from the checkpoints)
    sections.use_pretrained_model(config, arg.model)

  config.data = stage_sections.prompt_data_section(
      arg.lang, sections.batch_for(arg.size, arg.batch), max_prompt_len=32 if tiny else 64)
  config.sampling = sections.sampling_section(max_new_tokens=16 if tiny else 48)
  config.ppo = stage_sections.ppo_section(tiny)
  config.kl = stage_sections.kl_section()
  config.ptx = stage_sections.ptx_section(tiny)
  config.optim = sections.optim_section(
      learning_rate={"tiny": 1e-4, "small": 3e-5}.get(arg.size, 1e-5), warmup_steps=0,
      schedule="linear",  # over the iterations x epochs x minibatches updates
      weight_decay=0.0, b2=0.999, eps=1e-5)
  config.train = sections.train_section(arg.steps, log_every=1)
  # The held-out answers are as long as the training ones, whatever sampling.max_new_tokens is.
  config.eval = stage_sections.ppo_eval_section(config.sampling, tiny, arg.steps)
  return config
