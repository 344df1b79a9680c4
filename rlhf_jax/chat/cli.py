"""The command-line flags the terminal chat and the web server share (which model, how it
samples), so both answer with the same model for the same flags.

Flags are defined when a command starts (`define_model_flags`), not at import: tests import
both front ends into one process, and absl refuses a flag name defined twice.
"""
from __future__ import annotations

from absl import flags

from rlhf_jax.chat import model_choice


def define_model_flags() -> dict:
  """Defines --workdir, --checkpoint and the sampling flags; {name: FlagHolder}."""
  return {
      "workdir": flags.DEFINE_string("workdir", None, "Workdir: its stages and feedback/ store.",
                                     required=True),
      "checkpoint": flags.DEFINE_string(
          "checkpoint", "",
          "A run dir, HF dir, .gguf or smollm2_135m ('' = newest stage of W)."),
      "max_new_tokens": flags.DEFINE_integer("max_new_tokens", 128, "Longest answer, in tokens."),
      "temperature": flags.DEFINE_float("temperature", 0.7, "Sampling temperature."),
      "top_p": flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass."),
      "greedy": flags.DEFINE_bool("greedy", False, "Argmax decoding."),
      "seed": flags.DEFINE_integer("seed", 0, "Sampling seed."),
  }


def generation(options: dict) -> model_choice.Generation:
  """How answers are sampled, from the flags `define_model_flags` made."""
  return model_choice.Generation(
      max_new_tokens=options["max_new_tokens"].value, temperature=options["temperature"].value,
      top_p=options["top_p"].value, greedy=options["greedy"].value, seed=options["seed"].value)
