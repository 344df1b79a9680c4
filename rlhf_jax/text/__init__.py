"""Tokenizers (sentencepiece, Hugging Face) and chat templates with their loss masks."""
