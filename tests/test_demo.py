"""`make demo`'s recipe end to end at size=tiny: every stage runs, then a re-run skips them."""
import json
import os

import pytest

from rlhf_jax import demo
from rlhf_jax.demo import SAMPLE_PROMPTS


@pytest.mark.slow
@pytest.mark.xdist_group("bundled_data")
def test_demo_runs_then_skips(tmp_path, bundled_data_dir, capsys):
  workdir = str(tmp_path)
  out = demo.run_demo(workdir, size="tiny", pretrain_steps=3, sft_steps=3,
                      data_dir=bundled_data_dir)
  for lang in ("en", "zh"):
    assert [s["prompt"] for s in out[lang]] == SAMPLE_PROMPTS[lang]
    assert all(isinstance(s["answer"], str) for s in out[lang])
  with open(os.path.join(workdir, "samples.json")) as f:
    assert json.load(f) == out
  for stage in ("pretrain", "sft"):
    assert os.path.exists(os.path.join(workdir, stage, "metrics.jsonl"))
  capsys.readouterr()

  demo.run_demo(workdir, size="tiny", pretrain_steps=3, sft_steps=3, data_dir=bundled_data_dir)
  printed = capsys.readouterr().out
  for stage in ("tokenizer", "pretrain", "sft"):
    assert f"[{stage}] already" in printed
