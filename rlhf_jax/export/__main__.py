"""python -m rlhf_jax.export --run=W/ppo --out=D [--dtype=bfloat16] [--gguf]."""
import sys

from rlhf_jax.export.run_folder_export import main

if __name__ == "__main__":
  sys.exit(main())
