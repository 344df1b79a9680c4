"""Streaming answers and the terminal chat: the stream adds up to `respond.answer` (English and
Chinese), characters split over byte pieces arrive whole, the model to chat with is found in a
pipeline workdir (newest finished stage; a PPO run's shape and tokenizer from its SFT run; an
imported Hugging Face directory), and the terminal loop, driven with fake stdin / stdout and a
real tiny model, stores what was said and rated (also as `python -m rlhf_jax.chat`)."""
import io
import os
import subprocess
import sys
import time

import jax
import pytest

from helpers import write_policy_run
from rlhf_jax.config import util as config_util
from rlhf_jax.chat import terminal as chat, model_choice as chat_model
from rlhf_jax.infer import answers as respond
from rlhf_jax.text import tokenizer as tok_lib
from rlhf_jax.data import feedback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = {"en": "Hi! What do you like to do on weekends?", "zh": "你好，你今天过得怎么样？"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bundled_tokenizer):
  """A pipeline-like workdir with one finished SFT stage of a random tiny model."""
  workdir = str(tmp_path_factory.mktemp("chat"))
  tokenizer = tok_lib.Tokenizer.load(bundled_tokenizer)
  params, _ = write_policy_run(os.path.join(workdir, "sft"), bundled_tokenizer,
                               tokenizer.vocab_size, scale=0.3, step=2, steps=2)
  return workdir, tokenizer, params


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_stream_adds_up_to_the_greedy_answer(tiny, lang):
  _, tokenizer, params = tiny
  model = chat_model.load_run(os.path.join(tiny[0], "sft"))
  conversation = [{"role": "user", "content": PROMPTS[lang]}]
  pieces = list(respond.stream_answer(params, model.model_config, tokenizer, conversation,
                                      rng=jax.random.key(0), max_new_tokens=12, greedy=True))
  # The reference: the batched while-loop sampler, on the same conversation.
  (expected,) = respond.answer(params, model.model_config, tokenizer, [conversation],
                               rng=jax.random.key(0), max_new_tokens=12, greedy=True)
  assert "".join(pieces) == expected
  assert len(pieces) > 1  # streamed, not handed over at the end
  assert all(pieces)  # no empty increments


def test_incremental_decoder_never_splits_a_character(tiny):
  _, tokenizer, _ = tiny
  text = "好😀a"
  # One byte piece per UTF-8 byte: 3 for 好, 4 for the emoji, 1 for 'a'.
  ids = [tokenizer._sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
  assert tokenizer.decode(ids) == text
  decoder = respond.IncrementalDecoder(tokenizer)
  out = [decoder.push(i) for i in ids]
  assert out == ["", "", "好", "", "", "", "😀", "a"]
  assert decoder.finish() == ""
  # A character that never completes is handed out at the end, as decode shows it.
  decoder = respond.IncrementalDecoder(tokenizer)
  assert [decoder.push(i) for i in ids[:2]] == ["", ""]
  assert decoder.finish() == tokenizer.decode(ids[:2])


def test_newest_finished_stage_is_chosen(tmp_path, bundled_tokenizer):
  vocab = tok_lib.Tokenizer.load(bundled_tokenizer).vocab_size
  with pytest.raises(FileNotFoundError, match="kto, dpo, ppo, sft"):
    chat_model.find_stage(str(tmp_path))
  write_policy_run(str(tmp_path / "sft"), bundled_tokenizer, vocab, step=3, steps=3)
  write_policy_run(str(tmp_path / "ppo"), bundled_tokenizer, vocab, step=1, steps=5)
  assert chat_model.find_stage(str(tmp_path)) == str(tmp_path / "sft")  # ppo is unfinished
  time.sleep(0.05)  # a later modification time
  write_policy_run(str(tmp_path / "kto"), bundled_tokenizer, vocab, step=2, steps=2)
  assert chat_model.find_stage(str(tmp_path)) == str(tmp_path / "kto")
  # A workdir that is itself a run.
  write_policy_run(str(tmp_path / "solo"), bundled_tokenizer, vocab)
  assert chat_model.find_stage(str(tmp_path / "solo")) == str(tmp_path / "solo")


def test_a_run_answers_from_its_own_record(tmp_path, bundled_tokenizer):
  """The model's shape and tokenizer come from the run's record, never from its saved config or
  the runs it points to: a saved config claiming another shape and another run's tokenizer
  changes nothing, and the run still loads once the SFT run it came from is gone."""
  import shutil
  vocab = tok_lib.Tokenizer.load(bundled_tokenizer).vocab_size
  sft, ppo = str(tmp_path / "sft"), str(tmp_path / "ppo")
  write_policy_run(sft, bundled_tokenizer, vocab)
  params, saved = write_policy_run(ppo, bundled_tokenizer, vocab, step=4, steps=4, seed=7,
                                   config={"sft_dir": sft, "trainer": "ppo"})
  from rlhf_jax.core import run_folder
  ckpt = run_folder.checkpointer(ppo, async_save=False)
  ckpt.save(5, params, {"step": 5}, {}, {**saved, "model": config_util.model_section(
      "small").to_dict(), "tokenizer": {"path": "/nonexistent/tokenizer.model"}}, force=True)
  ckpt.close()
  shutil.rmtree(sft)
  model = chat_model.load_chat_model(str(tmp_path), ppo)
  assert model.step == 5 and model.checkpoint_dir == run_folder.checkpoint_dir(ppo)
  assert model.model_config.d_model == 64  # tiny, from the record
  assert model.tokenizer.path == run_folder.tokenizer_file(ppo)  # the run's own copy
  # The PPO params, not the SFT run's.
  assert (jax.device_get(model.params["embed"]["embedding"]) ==
          jax.device_get(params["embed"]["embedding"])).all()


def test_reward_model_or_empty_dir_is_a_clear_error(tmp_path, bundled_tokenizer):
  from helpers import write_run
  from rlhf_jax.models import ScalarModel, model_config
  import ppo_setup
  vocab = tok_lib.Tokenizer.load(bundled_tokenizer).vocab_size
  shape = model_config("tiny", vocab_size=vocab)
  write_run(str(tmp_path / "rm"), ppo_setup.random_params(ScalarModel(shape), 0), shape,
            bundled_tokenizer, kind="scalar")
  with pytest.raises(ValueError, match="not a language model"):
    chat_model.load_chat_model(str(tmp_path), str(tmp_path / "rm"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no orbax checkpoint"):
    chat_model.load_chat_model(str(tmp_path), str(tmp_path / "empty"))


def test_imported_hugging_face_directory(tmp_path):
  """A Hugging Face directory (weights + tokenizer.json with its chat template) is chatted with
  like a run: same answers as our params with the same tokenizer."""
  pytest.importorskip("tokenizers")
  from rlhf_jax.text.hf_tokenizer import HFTokenizer
  from rlhf_jax.models import Transformer, model_config, pretrained
  from rlhf_jax.export import hf_export
  import ppo_setup
  try:
    source = pretrained.smollm2_135m_path()
  except FileNotFoundError as e:
    pytest.skip(f"needs SmolLM2's tokenizer: {e}")
  tokenizer = HFTokenizer.load(source)
  cfg = model_config("tiny", vocab_size=tokenizer.vocab_size)
  params = ppo_setup.random_params(Transformer(cfg), 3, scale=0.3)
  hf_export.export_pretrained(params, cfg, str(tmp_path / "hf"), tokenizer=tokenizer)
  model = chat_model.load_chat_model(str(tmp_path), str(tmp_path / "hf"),
                                     chat_model.Generation(max_new_tokens=12, greedy=True))
  assert model.step is None and model.checkpoint_dir == str(tmp_path / "hf")
  conversation = [{"role": "user", "content": "What is the capital of France?"}]
  expected = "".join(respond.stream_answer(params, cfg, tokenizer, conversation,
                                           rng=jax.random.key(0), max_new_tokens=12,
                                           greedy=True))
  assert model.reply(conversation) == expected


def test_terminal_chat_stores_what_was_said_and_rated(tiny):
  workdir, tokenizer, params = tiny
  model = chat_model.load_chat_model(workdir, "", chat_model.Generation(max_new_tokens=12,
                                                                        greedy=True))
  assert model.checkpoint_dir == os.path.join(workdir, "sft", "checkpoints") and model.step == 2
  script = ["/like", "hello there", "/like", "and a second question", "/dislike", "/like",
            "/reset", "  ", "//slash text", "/dislike", "/bogus", "/quit", "never read"]
  stdin, stdout = io.StringIO("\n".join(script) + "\n"), io.StringIO()
  path = feedback.default_path(workdir)
  with feedback.FeedbackStore(path) as store:
    chat.TerminalChat(model, store, lang="zh", stdin=stdin, stdout=stdout).run()
  out = stdout.getvalue()
  assert "(no answer to rate yet)" in out and "(unknown command /bogus" in out

  with feedback.FeedbackStore(path) as store:
    conversations = [store.conversation(c) for c in store.conversation_ids()]
    events = store.feedback_rows()
  assert len(conversations) == 2 and all(c["lang"] == "zh" for c in conversations)
  first, second = (c["messages"] for c in conversations)
  assert [(m["role"], m["content"]) for m in first[::2]] == [
      ("user", "hello there"), ("user", "and a second question")]
  assert [(m["role"], m["content"]) for m in second[::2]] == [("user", "/slash text")]
  # Each answer is the greedy answer to the conversation so far (stream_answer, which the
  # tests above hold to the batched sampler), was printed as streamed, and carries the
  # checkpoint that wrote it.
  for messages in (first, second):
    for k in range(1, len(messages), 2):
      history = [{"role": m["role"], "content": m["content"]} for m in messages[:k]]
      expected = "".join(respond.stream_answer(params, model.model_config, tokenizer, history,
                                               rng=jax.random.key(0), max_new_tokens=12,
                                               greedy=True))
      answer = messages[k]
      assert answer["role"] == "assistant" and answer["content"] == expected
      assert f"model> {expected}\n" in out
      assert answer["checkpoint_step"] == 2
      assert answer["checkpoint_dir"] == model.checkpoint_dir
  # /like, /dislike, /like on the first conversation's answers, /dislike on the second's.
  assert [(e["message_id"], e["label"]) for e in events] == [
      (first[1]["id"], "like"), (first[3]["id"], "dislike"), (first[3]["id"], "like"),
      (second[1]["id"], "dislike")]
  assert [first[1]["label"], first[3]["label"], second[1]["label"]] == ["like", "like",
                                                                        "dislike"]


@pytest.mark.slow
def test_python_dash_m_chat_is_the_terminal_chat(tiny, tmp_path):
  """`python -m rlhf_jax.chat` runs the terminal loop with the shared model flags."""
  run, tokenizer, params = os.path.join(tiny[0], "sft"), tiny[1], tiny[2]
  workdir = str(tmp_path / "w")
  out = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.chat", f"--workdir={workdir}", f"--checkpoint={run}",
       "--lang=zh", "--max_new_tokens=6", "--greedy"],
      input="hello there\n/like\n/quit\n", cwd=REPO, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  model_config = chat_model.load_run(run).model_config
  conversation = [{"role": "user", "content": "hello there"}]
  expected = "".join(respond.stream_answer(params, model_config, tokenizer, conversation,
                                           rng=jax.random.key(0), max_new_tokens=6,
                                           greedy=True))
  assert f"model> {expected}\n" in out.stdout
  with feedback.FeedbackStore(feedback.default_path(workdir)) as store:
    (cid,) = store.conversation_ids()
    conv = store.conversation(cid)
  assert conv["lang"] == "zh"
  assert [(m["role"], m["content"], m["label"]) for m in conv["messages"]] == [
      ("user", "hello there", None), ("assistant", expected, "like")]
