"""Scanned and unrolled layers hold the same params stacked differently (models/layer_layout.py):
restacking gives the other layout's exact tree and the same logits, and a run folder saved in
one layout (full or LoRA, and a LoRA run on a base of the other layout) loads into a model
built in the other. A run resumed in the other layout is refused: its optimizer state is in
the saved one."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import flat_params, tiny_lm_config

from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.core import run_folder
from rlhf_jax.models import Transformer, layer_layout, lora
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.models.sizes import model_config
from rlhf_jax.train import lm

pytestmark = pytest.mark.xdist_group("layer_layout")

UNROLLED = model_config("tiny", vocab_size=64)
SCANNED = dataclasses.replace(UNROLLED, scan_layers=True)


def _inputs(b=2, t=10):
  tokens = jax.random.randint(jax.random.key(3), (b, t), 0, UNROLLED.vocab_size)
  return tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32)


def _logits(config, params):
  return np.asarray(Transformer(config).apply({"params": params}, *_inputs())[0])


def _shapes(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}


def test_restacked_params_are_the_other_layouts_tree_and_compute_the_same_logits():
  unrolled = jax.device_get(nn.unbox(
      Transformer(UNROLLED).init(jax.random.key(0), *_inputs())["params"]))
  scanned_init = jax.eval_shape(
      lambda: nn.unbox(Transformer(SCANNED).init(jax.random.key(0), *_inputs())["params"]))
  scanned = layer_layout.to_layout(unrolled, scan=True)
  assert layer_layout.layout_of(unrolled) is False and layer_layout.layout_of(scanned) is True
  assert _shapes(scanned) == _shapes(scanned_init)  # same paths, [L, ...] leaves
  want, got = _logits(UNROLLED, unrolled), _logits(SCANNED, scanned)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # Back again: the very same arrays, and a tree already in a layout is left alone.
  back = layer_layout.to_layout(scanned, scan=False)
  for name, value in flat_params(unrolled).items():
    np.testing.assert_array_equal(flat_params(back)[name], value, err_msg=name)
  assert layer_layout.to_layout(unrolled, scan=False) == unrolled
  # Nested trees (a scalar model's trunk and head) and trees without layers.
  scalar = jax.device_get(nn.unbox(
      ScalarModel(UNROLLED).init(jax.random.key(1), *_inputs())["params"]))
  restacked = layer_layout.like(scalar, {"trunk": scanned})
  assert set(restacked) == set(scalar) and layer_layout.layout_of(restacked["trunk"]) is True
  np.testing.assert_array_equal(restacked["head"]["dense"]["kernel"],
                                scalar["head"]["dense"]["kernel"])
  assert layer_layout.like({"head": 1.0}, scanned) == {"head": 1.0}


def test_gapped_layer_names_are_an_error_not_a_silent_stack():
  with pytest.raises(ValueError, match="layer_0 .. layer_1"):
    layer_layout.to_layout({"layer_0": {"w": np.ones(2)}, "layer_2": {"w": np.ones(2)}}, True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A full unrolled run, and a LoRA run trained on it with scanned layers."""
  root = tmp_path_factory.mktemp("layout")
  base, adapted = str(root / "base"), str(root / "lora")
  lm.train(tiny_lm_config(steps=2), base)
  config = tiny_lm_config(steps=3)
  config.init_from = base
  config.model.scan_layers = True
  config.lora.rank, config.lora.alpha = 4, 8.0
  config.optim.learning_rate = 1e-2
  lm.train(config, adapted)
  return base, adapted


def _like(config, seq_len=16):
  """Params laid out (and placed) as a trainer builds them for `config`."""
  model = lm.build_model(config, config.model.vocab_size)
  mesh, rules = lm.setup_mesh(config)
  state, _ = lm.create_train_state(lm.init_params_fn(model, seq_len), optax.adam(1e-3), mesh,
                                   rules, 0)
  return state.params


def test_a_full_run_loads_into_the_other_layout(runs):
  base, _ = runs
  saved = ckpt_lib.read_params(run_folder.checkpoint_dir(base))
  assert layer_layout.layout_of(saved) is False
  config = tiny_lm_config(steps=1)
  config.model.scan_layers = True
  restored = run_folder.restore_params(base, _like(config))
  want = flat_params(layer_layout.to_layout(saved, scan=True))
  got = flat_params(restored)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_lora_run_on_a_base_of_the_other_layout_folds_into_either(runs):
  base, adapted = runs
  assert run_folder.model_config(adapted).scan_layers  # the record says scanned
  assert layer_layout.layout_of(ckpt_lib.read_params(run_folder.checkpoint_dir(adapted)))
  scanned, scanned_cfg = run_folder.load_policy(adapted)
  unrolled, unrolled_cfg = run_folder.load_policy(adapted, scan_layers=False)
  assert scanned_cfg.scan_layers and not unrolled_cfg.scan_layers
  assert lora.count_adapters(unrolled) == 0 and layer_layout.layout_of(unrolled) is False
  want, got = _logits(scanned_cfg, scanned), _logits(unrolled_cfg, unrolled)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # The adapters trained: the folded model is not the base (the check above is not vacuous).
  plain, plain_cfg = run_folder.load_policy(base)
  assert np.abs(_logits(plain_cfg, plain) - got).max() > 1e-4 * np.abs(want).max()
  # A later stage building unrolled params starts from the same folded weights.
  restored = flat_params(run_folder.restore_params(adapted, _like(tiny_lm_config(steps=1))))
  for name, value in flat_params(unrolled).items():
    np.testing.assert_array_equal(restored[name], value, err_msg=name)


def test_resuming_a_run_in_the_other_layout_is_refused_naming_the_field(runs):
  _, adapted = runs
  config = run_folder.model_config(adapted, scan_layers=False)
  with pytest.raises(run_folder.RunFolderError, match="model.scan_layers: recorded True"):
    run_folder.write_record(adapted, model_config=config, tokenizer=None, kind="policy",
                            extra={"base": run_folder.read_record(adapted)["base"]})


def test_a_lora_runs_base_is_recognised_in_either_layout_and_a_changed_one_is_not(runs):
  base, adapted = runs
  saved = ckpt_lib.read_params(run_folder.checkpoint_dir(base))  # unrolled; recorded scanned
  for params in (saved, layer_layout.to_layout(saved, scan=True)):
    run_folder.check_base(adapted, params)
  changed = jax.tree.map(lambda x: x, saved)
  changed["layer_1"]["mlp"]["up"]["kernel"] = changed["layer_1"]["mlp"]["up"]["kernel"] * 1.5
  with pytest.raises(run_folder.RunFolderError, match="fingerprint"):
    run_folder.check_base(adapted, changed)
