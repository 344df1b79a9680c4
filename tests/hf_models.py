"""Shared by the import tests of Qwen3 and Gemma 3: small randomly initialised `transformers`
models (no download), our forward and greedy sampler on the imported params, and transformers'
own forward and `generate` as the reference. Token ids are UTF-8 bytes (a 256-token vocabulary):
English text gives ids below 128, Chinese text three ids of 128 and above per character.

Import it after `pytest.importorskip("torch")` / `("transformers")`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from rlhf_jax.infer.sampling import SamplingParams, make_generate_fn
from rlhf_jax.models import hf_import
from rlhf_jax.models.transformer import Transformer

V = 256
REL_TOL = 1e-4
ENGLISH = "The quick brown fox jumps over the lazy dog while the cat sleeps."
CHINESE = "我们今天去公园散步，天气很好，孩子们玩得很开心。"


def byte_ids(text: str) -> list[int]:
  return list(text.encode("utf-8"))


def randomize(model, seed: int, norm_offset: bool = False):
  """Every parameter drawn at random, so a tensor mapped to the wrong place changes the logits.

  Norm weights scatter around 1 (or around 0 for Gemma's (1 + w) norms, `norm_offset`);
  embeddings have std 1 and the rest 0.15, which gives peaked logits (greedy ties unlikely).
  """
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_((0.0 if norm_offset else 1.0) + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 1.0 if "embed" in name else 0.15)
  return model.eval()


def save_and_import(model, directory: str):
  """(our ModelConfig, params) of `model` written as safetensors by transformers."""
  model.save_pretrained(directory, safe_serialization=True)
  return hf_import.load_pretrained(directory)


def rel_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def our_logits(model_config, params, tokens) -> np.ndarray:
  tokens = jnp.asarray(np.asarray(tokens), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  fn = jax.jit(lambda p, t: Transformer(model_config).apply({"params": p}, t, positions,
                                                            jnp.ones_like(t))[0])
  return np.asarray(fn(params, tokens))


def hf_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def our_greedy(model_config, params, prompts, new_tokens: int) -> list[list[int]]:
  """Greedy continuations of `prompts` (lists of ids), left-padded into one batch."""
  width = max(map(len, prompts))
  tokens = np.array([[0] * (width - len(p)) + list(p) for p in prompts], np.int32)
  mask = (np.arange(width)[None] >= width - np.array([[len(p)] for p in prompts]))
  generate = make_generate_fn(model_config, new_tokens, (), 0, SamplingParams(greedy=True))
  out = generate({"params": params}, tokens, mask.astype(np.int32), jax.random.key(0))
  return np.asarray(out["tokens"]).tolist()


def hf_greedy(model, prompt, new_tokens: int) -> list[int]:
  with torch.no_grad():
    out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
  return out[0, len(prompt):].tolist()
