"""Two processes on localhost (jax.distributed, gloo) train exactly like one process."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from rlhf_jax.core import checkpoint as ckpt_lib
from tests.helpers import flat_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config=configs/pretrain.py:size=tiny,steps=3,batch=8,seq_len=16,data=synthetic",
        "--config.model.vocab_size=128", "--config.train.checkpoint_every=3",
        "--config.mesh.data=-1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices_per_process: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")


def _params(workdir):
  directory = os.path.join(workdir, "checkpoints")
  step = ckpt_lib.Checkpointer(directory).latest_step()
  return step, flat_params(ckpt_lib.read_params(directory, step))


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_match_one(tmp_path):
  single = str(tmp_path / "single")
  subprocess.run([sys.executable, "-m", "rlhf_jax.main", *ARGS, f"--workdir={single}"],
                 cwd=REPO, env=_env(4), check=True, capture_output=True, timeout=300)

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "rlhf_jax.main", *ARGS, f"--workdir={multi}",
       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "process 1 of 2" in outputs[1]

  step_single, ref = _params(single)
  step_multi, got = _params(multi)
  assert step_single == step_multi == 3
  for name in ref:
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=5e-5, err_msg=name)
