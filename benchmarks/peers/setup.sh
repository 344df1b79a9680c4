#!/usr/bin/env bash
# Builds benchmarks/peers/.venv: the peer frameworks the benchmarks compare with, in a virtual
# environment of their own (the package never depends on them). Pins: torch 2.13.0 (the CPU
# wheel; `pip install torch==2.13.0` takes the local file where the machine has one), trl 1.9.0
# (the last release with PPOTrainer, under trl.experimental.ppo), and the transformers,
# accelerate and datasets releases trl 1.9.0's own requirements resolved to when this was set
# up (it asks for transformers>=4.56.2, accelerate>=1.4.0, datasets>=4.7.0).
#
#   bash benchmarks/peers/setup.sh          # or: make peers
#   benchmarks/peers/.venv/bin/python benchmarks/peers/trl_ppo.py
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
stamp="$venv/.installed-$(sha1sum "$here/setup.sh" | cut -c1-12)"
if [ -e "$stamp" ]; then
  echo "peers venv up to date: $venv"
  exit 0
fi
test -x "$venv/bin/python" || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and alone: with it installed, the others' torch requirement is already met and
# pip never reaches for a CUDA build.
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q trl==1.9.0 transformers==5.24.0 accelerate==1.15.0 \
  datasets==5.2.0
rm -f "$venv"/.installed-*
touch "$stamp"
"$venv/bin/python" -c "import torch, trl, transformers; print('peers venv: torch', \
torch.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__)"
