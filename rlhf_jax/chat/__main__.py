"""`python -m rlhf_jax.chat --workdir=W [--checkpoint=DIR] [--lang=en|zh]`: the terminal chat
(rlhf_jax.chat.terminal has the commands and flags; rlhf_jax.chat.server is the web page)."""
from rlhf_jax.chat import terminal

if __name__ == "__main__":
  terminal.run_cli()
