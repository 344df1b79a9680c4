"""A user's own data: JSONL chats imported to TFDS train SFT; a long chat is cut at a turn."""
import json

import numpy as np
import pytest

from rlhf_jax.config import util as config_util
from rlhf_jax.train import launch
from rlhf_jax.text import tokenizer as tok_lib
from rlhf_jax.data import jsonl
from rlhf_jax.train.inputs import fit_conversation, tokenize_fn_for


def test_sft_on_imported_jsonl_chats(tmp_path, bundled_tokenizer):
  path = tmp_path / "chats.jsonl"
  with open(path, "w") as f:
    for i in range(60):
      f.write(json.dumps({"messages": [
          {"role": "user", "content": f"What is {i} plus one?"},
          {"role": "assistant", "content": f"It is {i + 1}."}]}) + "\n")
  data_dir = str(tmp_path / "tfds")
  name = jsonl.import_jsonl(str(path), "messages", config="mine", data_dir=data_dir)
  assert name == "rlhf_dialogues/mine"

  config = config_util.load_config("configs/sft.py:size=tiny,steps=2")
  with config.unlocked():
    config.data.name, config.data.data_dir = name, data_dir
    config.tokenizer.path = bundled_tokenizer
  metrics = launch.run(config, str(tmp_path / "run"))
  assert metrics["train/tokens"] > 0


def test_long_chat_is_cut_at_a_turn_boundary(bundled_tokenizer):
  tok = tok_lib.Tokenizer.load(bundled_tokenizer)
  turns = [{"role": "user", "content": "hello there"},
           {"role": "assistant", "content": "hi, how are you?"},
           {"role": "user", "content": "fine thanks " * 20},
           {"role": "assistant", "content": "great " * 40}]
  first_exchange, _ = tok.render_chat(turns[:2])
  whole, _ = tok.render_chat(turns)
  max_len = len(first_exchange) + 5
  assert len(whole) > max_len
  ids, mask = fit_conversation(tok, turns, max_len)
  np.testing.assert_array_equal(ids, first_exchange)  # the second exchange did not fit
  ids, _ = fit_conversation(tok, turns, len(whole))
  np.testing.assert_array_equal(ids, whole)


def test_text_records_need_the_configured_field(bundled_tokenizer):
  tok = tok_lib.Tokenizer.load(bundled_tokenizer)
  fn = tokenize_fn_for(tok, 64, text_field="body")
  ids, mask = fn({"body": "some text"})
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask.all()
  with pytest.raises(KeyError, match="set data.text_field"):
    fn({"text": "wrong field"})
