"""What a jitted step needs in memory, from XLA's own plan, before anything is allocated.

`compiled_memory(step, *abstract_args)` lowers and compiles the step for the given shapes
(jax.ShapeDtypeStruct or real arrays) and reads the compiled executable's memory analysis:
the bytes of its arguments, outputs, temporaries and generated code. The temporaries are what
a parameter count misses (activations, the logits [B, T, V], optimizer intermediates), and the
number that says whether a chunked vocabulary or a smaller micro-batch is needed.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

FIELDS = {  # our name: the attribute of jax's CompiledMemoryStats
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",  # outputs that reuse an argument's buffer (donation)
    "temp_bytes": "temp_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
}


def compiled_memory(fn: Callable, *abstract_args: Any, **abstract_kwargs: Any) -> dict:
  """{argument_bytes, output_bytes, alias_bytes, temp_bytes, generated_code_bytes,
  peak_bytes} of `fn` compiled for these argument shapes; per device for a sharded step.

  fn: a function or an already jitted one (its static arguments and shardings are kept).
  peak_bytes = arguments + outputs − aliased + temporaries: the most the step holds at once
  by XLA's plan (code excluded). Raises RuntimeError where the backend gives no analysis.
  """
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  return executable_memory(jitted.lower(*abstract_args, **abstract_kwargs).compile())


def executable_memory(compiled) -> dict:
  """`compiled_memory`'s dict, read from an executable already compiled (`.compile()`): a
  benchmark that runs the executable it measured compiles it once."""
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
  out = {name: int(getattr(stats, attr)) for name, attr in FIELDS.items()}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                       + out["temp_bytes"])
  return out
