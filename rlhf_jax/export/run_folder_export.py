"""Export any policy run folder for standard clients: a Hugging Face directory, or a GGUF file.

  python -m rlhf_jax.export --run=W/ppo --out=D [--dtype=bfloat16] [--step=N]
  python -m rlhf_jax.export --run=W/ppo --out=policy.gguf --gguf [--dtype=float16]

The run folder's record (rlhf_jax/core/run_folder.py) says what its params are and which
tokenizer reads its ids, so nothing else needs to be named. The HF directory holds config.json,
model.safetensors, generation_config.json (stop ids: the turn end and EOS) and the tokenizer
files `AutoTokenizer` needs, chat template included (rlhf_jax/export/hf_export.py):
`AutoModelForCausalLM`, `AutoTokenizer`, `apply_chat_template` and
`pipeline("text-generation")` load it as is.

`--gguf` writes one GGUF file (rlhf_jax/export/gguf_export.py: llama, qwen2, qwen3 or gemma3)
in float32, float16 or bfloat16; no quantised types (quantise it with llama.cpp's
llama-quantize).

Bad input fails before any work with a message naming it: a missing run folder, a folder that
is not a policy run, an unknown dtype.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from rlhf_jax.core import run_folder
from rlhf_jax.export import gguf_export, hf_export

log = logging.getLogger(__name__)


class ExportError(ValueError):
  """Input the export cannot work with; the message says what and how to fix it."""


def _check(run: str, out: str, dtype: str, gguf: bool) -> None:
  allowed = gguf_export.GGUF_DTYPES if gguf else tuple(hf_export.DTYPES)
  if dtype not in allowed:
    raise ExportError(f"--dtype={dtype!r} is not one of {list(allowed)}")
  if not out:
    raise ExportError("--out is required: the directory (or, with --gguf, the .gguf file) to write")
  if not os.path.isdir(run_folder.root(run)):
    raise ExportError(f"no run folder {run_folder.root(run)}")
  try:
    record = run_folder.read_record(run)
  except (FileNotFoundError, run_folder.RunFolderError) as e:
    raise ExportError(str(e)) from None
  if record["kind"] != "policy":
    raise ExportError(f"{run_folder.root(run)} holds a {record['kind']} model (a reward model "
                      "or critic); only policy runs (SFT, PPO, KTO, DPO) export as language models")
  if not run_folder.has_checkpoint(run):
    raise ExportError(f"{run_folder.root(run)} has no checkpoint yet: train it first")


def _tokenizer(run: str):
  """The run's tokenizer, or None (with a warning) for a run trained on synthetic tokens."""
  try:
    return run_folder.tokenizer(run)
  except run_folder.RunFolderError as e:
    if "synthetic" not in str(e):
      raise
    log.warning("%s: exporting without tokenizer files", e)
    return None


def export_run(run: str, out: str, *, dtype: str = "float32", gguf: bool = False,
               step: Optional[int] = None) -> str:
  """Exports `run` to `out` (module docstring); returns the path written."""
  _check(run, out, dtype, gguf)
  params, model_config = run_folder.load_policy(run, step)
  tokenizer = _tokenizer(run)
  if gguf:
    name = os.path.basename(run_folder.root(run))
    return gguf_export.write_gguf(params, model_config, out, tokenizer=tokenizer, dtype=dtype,
                                  name=name)
  return hf_export.export_pretrained(params, model_config, out, tokenizer=tokenizer, dtype=dtype)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m rlhf_jax.export",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--run", required=True, help="the policy run folder (e.g. W/ppo)")
  parser.add_argument("--out", required=True, help="output directory, or .gguf file with --gguf")
  parser.add_argument("--dtype", default="float32",
                      help="float32 (logits equal ours), bfloat16 or float16")
  parser.add_argument("--gguf", action="store_true", help="write one GGUF file instead")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  return parser.parse_args(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    path = export_run(args.run, args.out, dtype=args.dtype, gguf=args.gguf, step=args.step)
  except ExportError as e:
    print(f"export: {e}", file=sys.stderr)
    return 2
  print(f"exported {run_folder.root(args.run)} to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
