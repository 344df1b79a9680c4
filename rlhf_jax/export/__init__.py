"""Exports that other tools load: Hugging Face directories (safetensors, tokenizer files, chat
template) and GGUF files, from params or from any policy run folder (`python -m rlhf_jax.export`)."""
