"""A record -> (token ids, loss mask): how next-token stages turn chats and text into examples.

Chats go through the tokenizer's chat template, cut at turn boundaries to fit a row; plain
text is trained on fully. Shared by the trainers' inputs (train/inputs.py) and the data card's
SFT mix (data/card.py), so both count the same tokens.
"""
from __future__ import annotations


def fit_conversation(tokenizer, messages, max_len: int):
  """The longest run of whole turns, ending on an assistant turn, that renders in `max_len`.

  Long chats are cut at a turn boundary rather than mid-answer, so SFT trains on complete
  exchanges; a conversation whose first exchange alone is too long is returned whole (the
  pipeline then truncates it, and counts it).
  """
  ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
  best = None
  for end in ends:  # grow whole exchanges until the next one no longer fits
    ids, mask = tokenizer.render_chat(messages[:end + 1])
    if len(ids) > max_len:
      break
    best = (ids, mask)
  return best if best is not None else tokenizer.render_chat(messages)


def tokenize_fn_for(tokenizer, max_len: int | None = None, text_field: str = "text"):
  """record -> (ids, loss_mask): chats through the chat template, plain text trained on fully.

  Any TFDS dataset works: records with `messages` are chats, otherwise `text_field` is read.
  """
  import numpy as np

  def tokenize(record):
    if "messages" in record:
      if max_len:
        return fit_conversation(tokenizer, record["messages"], max_len)
      return tokenizer.render_chat(record["messages"])
    if text_field not in record:
      raise KeyError(f"record {record.get('id', '')!r} has fields {sorted(record)}: expected "
                     f"'messages' (a chat) or {text_field!r} (text); set data.text_field")
    text = record[text_field]
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    ids = np.asarray([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id], np.int32)
    return ids, np.ones_like(ids)

  return tokenize
