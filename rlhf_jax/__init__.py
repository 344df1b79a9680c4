"""rlhf_jax: the ChatGPT recipe -- SFT, reward model, PPO, user feedback -- in JAX/Flax."""
__version__ = "0.1.0"
