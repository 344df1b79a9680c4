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
import ml_collections

from rlhf_jax.config import util as config_util


def get_config(arg=None):
  arg = config_util.parse_arg(arg, size="small", lang="both", steps=200, batch=64, sft="", rm="",
                              model="")
  tiny = arg.size == "tiny"
  config = config_util.base_lm_config(ml_collections.ConfigDict(dict(
      size=arg.size, steps=arg.steps, batch=arg.batch, seq_len=128)))
  config.trainer = "ppo"
  config.stage = "ppo"
  del config["init_from"]
  config.sft_dir = arg.sft  # an SFT workdir (its checkpoints/ and tokenizer); "" = random
  config.rm_dir = arg.rm  # a reward-model workdir (checkpoints/, normalization.json); "" = random
  if arg.model:  # an imported model: its own tokenizer (the shapes come from the checkpoints)
    config.model, config.tokenizer.path = config_util.pretrained_model_section(arg.model)
    config.tokenizer.vocab_size = config.model.vocab_size

  config.data.name = "rlhf_prompts"  # {prompt, lang}
  config.data.split = "train"
  config.data.lang = arg.lang
  config.data.batch_size = 8 if tiny else arg.batch  # episodes per iteration
  config.data.max_prompt_len = 32 if tiny else 64  # prompts are left-padded to this
  for unused in ("text_field", "seq_len", "pack"):
    del config.data[unused]

  config.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=16 if tiny else 48, temperature=1.0, top_k=0, top_p=1.0))

  config.ppo = ml_collections.ConfigDict(dict(
      epochs=2 if tiny else 4, minibatches=2 if tiny else 4,
      clip_eps=0.2, value_clip=0.2, vf_coef=0.1, ent_coef=0.0,
      gamma=1.0, lam=0.95,
      kl_estimator="k1",  # per-token KL in the reward: k1 (unbiased) or k3 (non-negative)
      whiten_rewards=False,  # scale-only whitening of the per-token rewards
      missing_eos_penalty=-1.0,  # the score of an answer with no stop token in the budget
      penalize_missing_eos=True,
      ema_decay=0.0,  # > 0: keep an EMA of the policy (InstructGPT: 0.992)
      # Where log pi_old comes from: the sampler's log-probs ("sampler", no extra forward
      # pass), a policy forward pass ("recompute"), or "auto": sampler at float32 compute,
      # recompute otherwise (a bfloat16 KV-cache decode rounds differently from a full pass).
      old_logprobs="auto"))

  config.kl = ml_collections.ConfigDict(dict(
      coef=0.05,  # beta; the initial one when adaptive
      adaptive=True, target=6.0, horizon=10000.0))  # Ziegler et al.: target in nats/answer

  # PPO-ptx (InstructGPT): + coef * next-token loss on pretraining text, `rows` per minibatch.
  config.ptx = ml_collections.ConfigDict(dict(
      coef=0.0, data="rlhf_text", split="train", rows=4 if tiny else 16,
      seq_len=32 if tiny else 128))

  config.optim.learning_rate = {"tiny": 1e-4, "small": 3e-5}.get(arg.size, 1e-5)
  config.optim.warmup_steps = 0
  config.optim.schedule = "linear"  # over the iterations x epochs x minibatches updates
  config.optim.weight_decay = 0.0
  config.optim.b2 = 0.999
  config.optim.eps = 1e-5

  config.train.log_every = 1
  config.train.checkpoint_every = max(arg.steps // 4, 1)

  config.eval = ml_collections.ConfigDict(dict(
      every=0 if tiny else max(arg.steps // 10, 1),  # iterations; 0 = only at the end
      split="validation", n_prompts=8 if tiny else 64,  # per language; 0 = no evaluation
      # tiny samples as in training, so evaluation reuses the compiled sampler
      temperature=1.0 if tiny else 0.7, top_p=1.0,
      max_new_tokens=config.sampling.max_new_tokens))
  return config
