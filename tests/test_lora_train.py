"""LoRA through the next-token trainer and the run folder: only adapters train and are saved,
the base stays bit-identical, resume is exact, readers fold the adapters onto the recorded base,
and a missing or changed base is an error naming both."""
import os
import shutil

import jax
import numpy as np
import optax
import pytest
from helpers import flat_params, tiny_lm_config

from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.core import run_folder
from rlhf_jax.models import Transformer, lora
from rlhf_jax.train import lm

# One worker builds this module's fixtures once (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("lora_train")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A full-parameter tiny run: the base every LoRA run here trains on."""
  workdir = str(tmp_path_factory.mktemp("lora") / "base")
  lm.train(tiny_lm_config(steps=2), workdir)
  return workdir


def _lora_config(base, steps=4, **overrides):
  config = tiny_lm_config(steps=steps, **overrides)
  config.init_from = base
  config.lora.rank = 4
  config.lora.alpha = 8.0
  config.optim.learning_rate = 1e-2
  return config


def test_lora_run_saves_adapters_only_and_readers_fold_them(base_run, tmp_path):
  run = str(tmp_path / "lora")
  lm.train(_lora_config(base_run), run)
  saved = ckpt_lib.read_params(run_folder.checkpoint_dir(run))
  n_layers = 2  # the tiny size
  assert lora.count_adapters(saved) == len(jax.tree.leaves(saved)) == 7 * 2 * n_layers

  record = run_folder.read_record(run)
  assert record["model"]["lora_rank"] == 4
  assert record["base"]["source"] == os.path.abspath(base_run)
  assert record["base"]["step"] == 2

  folded, config = run_folder.load_policy(run)
  assert config.lora_rank == 0 and lora.count_adapters(folded) == 0
  # The folded model computes what the unmerged LoRA model computes on the base.
  base = ckpt_lib.read_params(run_folder.checkpoint_dir(base_run))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, config.vocab_size)
  positions = np.broadcast_to(np.arange(16), (2, 16))
  segments = np.ones((2, 16), np.int32)
  lora_config = run_folder.model_config(run)
  unmerged = Transformer(lora_config).apply({"params": lora.merge(saved, base)}, tokens,
                                            positions, segments)[0]
  merged = Transformer(config).apply({"params": folded}, tokens, positions, segments)[0]
  scale = float(np.max(np.abs(unmerged)))
  assert float(np.max(np.abs(unmerged - merged))) <= 1e-5 * scale
  # ... and training moved it away from the base (the check above is not vacuous).
  plain = Transformer(config).apply({"params": base}, tokens, positions, segments)[0]
  assert float(np.max(np.abs(unmerged - plain))) > 1e-4 * scale


def test_steps_leave_the_base_bit_identical_and_adam_holds_adapters_only(base_run):
  config = _lora_config(base_run)
  model = lm.build_model(config, config.model.vocab_size)
  tx = optax.adam(1e-2)
  mesh, rules = lm.setup_mesh(config)
  state, shardings = lm.create_train_state(lm.init_params_fn(model, 16), tx, mesh, rules, 0,
                                           split_lora=True)
  state, _ = lm.load_lora_base(state, base_run)
  before = flat_params(state.frozen)
  mu = optax.tree_utils.tree_get(state.opt_state, "mu")
  assert len(jax.tree.leaves(mu)) == lora.count_adapters(state.params) == 28
  step = jax.jit(lambda s, b: lm.train_step(s, b, model=model, tx=tx, schedule=lambda _: 0.0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (8, 17))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(16), (8, 16)),
           "segment_ids": np.ones((8, 16), np.int32), "loss_mask": np.ones((8, 16), np.float32)}
  adapters0 = flat_params(state.params)
  for _ in range(3):
    state, metrics = step(state, batch)
  assert bool(metrics["train/finite"])
  after = flat_params(state.frozen)
  for name in before:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  moved = flat_params(state.params)
  assert any(np.abs(moved[k] - adapters0[k]).max() > 0 for k in moved if "lora_b" in k)


@pytest.mark.heavy  # resume is bit-exact for every trainer in test_train.py; LoRA's in make test-all
def test_lora_resume_is_bit_exact(base_run, tmp_path):
  config = _lora_config(base_run, steps=4, **{"train.checkpoint_every": 2})
  straight = str(tmp_path / "straight")
  lm.train(config, straight)
  interrupted = str(tmp_path / "interrupted")
  config.train.stop_after = 2
  lm.train(config, interrupted)
  config.train.stop_after = 0
  lm.train(config, interrupted)
  a = flat_params(ckpt_lib.read_params(run_folder.checkpoint_dir(straight)))
  b = flat_params(ckpt_lib.read_params(run_folder.checkpoint_dir(interrupted)))
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_missing_or_changed_base_is_an_error_naming_both(base_run, tmp_path):
  base = str(tmp_path / "base_copy")
  shutil.copytree(base_run, base)
  run = str(tmp_path / "lora")
  lm.train(_lora_config(base, steps=2), run)
  run_folder.load_policy(run)  # fine while the base is there and unchanged

  # A different base in the same place: retrain it with another seed.
  shutil.rmtree(base)
  other = tiny_lm_config(steps=2)
  other.seed = 1
  lm.train(other, base)
  with pytest.raises(run_folder.RunFolderError) as e:
    run_folder.load_policy(run)
  assert os.path.abspath(run) in str(e.value) and base in str(e.value)
  assert "fingerprint" in str(e.value)

  shutil.rmtree(base)
  with pytest.raises(run_folder.RunFolderError) as e:
    run_folder.load_policy(run)
  assert os.path.abspath(run) in str(e.value) and base in str(e.value)


def test_a_workdir_moved_as_a_whole_finds_its_base(base_run, tmp_path):
  """The record keeps the base's path from the run folder too: after moving a workdir that
  holds both, the LoRA run reads its base at the new place (the fingerprint still checks it);
  with the base gone from both places, the error names both."""
  work = tmp_path / "work"
  shutil.copytree(base_run, work / "sft")
  lm.train(_lora_config(str(work / "sft"), steps=2), str(work / "lora"))
  before, _ = run_folder.load_policy(str(work / "lora"))
  record = run_folder.read_record(str(work / "lora"))
  assert record["base"]["relative"] == os.path.join("..", "sft")

  shutil.move(str(work), str(tmp_path / "moved"))
  after, _ = run_folder.load_policy(str(tmp_path / "moved" / "lora"))
  for name, a in flat_params(before).items():
    np.testing.assert_array_equal(a, flat_params(after)[name], err_msg=name)

  shutil.rmtree(tmp_path / "moved" / "sft")
  with pytest.raises(run_folder.RunFolderError) as e:
    run_folder.load_policy(str(tmp_path / "moved" / "lora"))
  assert str(work / "sft") in str(e.value) and os.path.join("..", "sft") in str(e.value)


def test_lora_without_a_base_is_a_clear_error(tmp_path):
  config = tiny_lm_config(steps=2)
  config.lora.rank = 4
  with pytest.raises(ValueError, match="init_from"):
    lm.train(config, str(tmp_path / "run"))


@pytest.mark.heavy  # restore_params folds LoRA runs (test_lora_ppo.py's shared-base test reads one folded)
def test_a_later_full_stage_starts_from_the_folded_lora_run(base_run, tmp_path):
  run = str(tmp_path / "lora")
  lm.train(_lora_config(base_run, steps=2), run)
  folded, _ = run_folder.load_policy(run)
  config = tiny_lm_config(steps=1)
  model = lm.build_model(config, config.model.vocab_size)
  mesh, rules = lm.setup_mesh(config)
  state, _ = lm.create_train_state(lm.init_params_fn(model, 16), optax.adam(1e-3), mesh, rules, 0)
  restored = run_folder.restore_params(run, state.params)
  want, got = flat_params(folded), flat_params(restored)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.heavy  # a LoRA run through the export into transformers; fold itself is tested in test_lora.py
def test_merged_export_loads_in_transformers_with_the_unmerged_logits(base_run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from rlhf_jax.export import hf_export
  run = str(tmp_path / "lora")
  lm.train(_lora_config(base_run, steps=2), run)
  folded, config = run_folder.load_policy(run)
  out = hf_export.export_pretrained(folded, config, str(tmp_path / "hf"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()

  saved = ckpt_lib.read_params(run_folder.checkpoint_dir(run))
  base = ckpt_lib.read_params(run_folder.checkpoint_dir(base_run))
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
  positions = np.broadcast_to(np.arange(16), (2, 16))
  unmerged = np.asarray(Transformer(run_folder.model_config(run)).apply(
      {"params": lora.merge(saved, base)}, tokens, positions, np.ones((2, 16), np.int32))[0])
  with torch.no_grad():
    theirs = hf(torch.as_tensor(tokens)).logits.numpy()
  scale = float(np.max(np.abs(unmerged)))
  assert float(np.max(np.abs(theirs - unmerged))) <= 1e-4 * scale
