"""Where a Gemma 3 answer should end: the next-token mass on <end_of_turn> against its
near-copies, for the base model and for a LoRA SFT run on it.

In Gemma 3 270M *base* the chat template's <end_of_turn> (id 106) is an untrained row of the
tied embedding: its cosine with the 6,242 <unused*> rows averages 0.91, and 4,664 rows lie
within cosine 0.99 of it. Under LoRA the embedding is frozen, so an adapter that learns to
"end the turn" raises all of them together. This script measures that on four short chats
(two per language), at the position that should emit <end_of_turn>, for the base model and
each SFT run given (with `lora.tokens` the run trains those rows; with `lora.tokens_start`
'106:1' the row starts as <eos>'s, which also stops an answer).

  python experiments/real_recipe/end_of_turn_probe.py workdirs/demo-real/sft [more SFT runs]
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.core import run_folder
from rlhf_jax.models import hf_import, pretrained
from rlhf_jax.models.transformer import Transformer

END_OF_TURN, EOS = 106, 1  # Gemma 3's '<end_of_turn>' and '<eos>': both stop an answer
CHATS = [("hi", "Hello! How are you today?"),
         ("What is your favourite food?", "I love pizza."),
         ("你好", "你好！很高兴认识你。"),
         ("今天天气怎么样？", "今天天气很好。")]


def _params(tree):
  return tree["params"] if "params" in tree else tree


def near_copies(params) -> np.ndarray:
  """Ids whose embedding row is within cosine 0.99 of <end_of_turn>'s (itself excluded)."""
  table = np.asarray(_params(params)["embed"]["embedding"], np.float32)  # [V, D]
  unit = table / np.linalg.norm(table, axis=1, keepdims=True)
  ids = np.flatnonzero(unit @ unit[END_OF_TURN] > 0.99)
  return ids[ids != END_OF_TURN]


def probe(label, params, config, tokenizer, unused, copies) -> None:
  model = Transformer(config)
  for user, answer in CHATS:
    ids, _ = tokenizer.render_chat([{"role": "user", "content": user},
                                    {"role": "assistant", "content": answer}])
    end = int(np.flatnonzero(ids == END_OF_TURN)[-1])
    tokens = jnp.asarray(ids[None, :end])  # [1, T]: everything before the answer's end
    out = model.apply({"params": _params(params)}, tokens, jnp.arange(end)[None],
                      jnp.ones((1, end), jnp.int32))
    logits = out[0] if isinstance(out, tuple) else out  # [1, T, V]
    p = np.asarray(jax.nn.softmax(logits[0, -1].astype(jnp.float32)))  # [V]
    print(f"| {label} | {answer} | {p[END_OF_TURN]:.4f} | {p[EOS]:.4f} | {p[unused].sum():.3f} "
          f"| {p[copies].sum():.3f} |")


def main(*sft_runs: str) -> None:
  tokenizer = run_folder.tokenizer(sft_runs[0])
  vocab = tokenizer._tok
  unused = np.array([i for i in range(vocab.get_vocab_size())
                     if (vocab.id_to_token(i) or "").startswith("<unused")])
  config, base = hf_import.load_pretrained(pretrained.resolve("gemma3_270m"))
  copies = near_copies(base)
  print(f"{len(unused)} <unused*> tokens; {len(copies)} rows within cosine 0.99 of "
        "<end_of_turn> in the base embedding\n")
  print("| model | answer | P(<end_of_turn>) | P(<eos>) | P(any <unused*>) | P(its near-copies) |")
  print("|---|---|---|---|---|---|")
  probe("base", base, config, tokenizer, unused, copies)
  for run in sft_runs:
    params, config = run_folder.load_policy(run)
    probe(run, params, config, tokenizer, unused, copies)


if __name__ == "__main__":
  main(*sys.argv[1:])
