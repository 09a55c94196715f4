# llm-pipeline: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch goes in first so that nothing later pulls a multi-GB CUDA build; on a machine that keeps a
# CPU wheel on disk (like ours) this takes seconds. Override for GPUs: make setup TORCH_SPEC='torch==2.13.0'
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup bytecode browser demo console console-screenshots test test-fast lint format bench-serve bench-adapters bench-curate bench-train bench-memory bench-soak clean help

help:
	@echo "make demo   - set up .venv, build the sample corpus, run curate -> train -> quantize -> serve"
	@echo "make test   - set up .venv and run the whole test suite (unit + integration, 50-60 minutes on 2 cores)"
	@echo "make test-fast - the unit tests only: no Ray, under 2 minutes"
	@echo "make console - after make demo: the web console on http://127.0.0.1:7860 (runs, data, training, playground)"
	@echo "make console-screenshots - the console's browser tests, writing their screenshots to docs/console/"
	@echo "make lint   - ruff check and ruff format --check (CI runs it first)"
	@echo "make format - ruff format and the safe ruff fixes, in place"
	@echo "make bench-serve - after make demo: serving QPS with @serve.batch on vs off (JSON)"
	@echo "make bench-adapters - after make demo: QPS with requests spread over 8 LoRA adapters vs on one (JSON)"
	@echo "make bench-curate - fuzzy dedup on 200 MB vs the datasketch MinHashLSH loop (JSON)"
	@echo "make bench-train - Ray Train recipe vs a plain PyTorch loop, same model and batch (JSON)"
	@echo "make bench-memory - each worker's peak memory against the plan, 1B model, ZeRO-2/3 and FSDP2 (JSON)"
	@echo "make bench-soak - 2,000 training steps and 20,000 requests: memory growth and latency drift (JSON)"
	@echo "make clean  - remove runs/ and the generated corpus"

setup: $(VENV)/.installed

# pip's own output (hundreds of lines where pip.conf names mirrors) goes to .venv/setup.log; its tail on failure
$(VENV)/.installed: pyproject.toml
	@echo "setting up $(VENV): $(TORCH_SPEC) (CPU) first, then this package and its dependencies (log: $(VENV)/setup.log)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@( $(PY) -m pip install -q --upgrade pip \
	  && ($(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)") \
	  && $(PY) -m pip install -q -e ".[dev]" ) > $(VENV)/setup.log 2>&1 \
	  || (tail -40 $(VENV)/setup.log; echo "setup failed: the whole log is $(VENV)/setup.log"; exit 1)
	@touch $@

data/corpus/.built: $(VENV)/.installed src/pipeline/sample_data.py
	$(VENV)/bin/pipeline sample-data --out data
	touch $@

# The package's own modules compiled ahead: where PYTHONDONTWRITEBYTECODE is set (as on this machine) no
# process writes them, so each Ray worker compiled the modules it imports again (2% of a training run's CPU)
bytecode: setup
	@$(PY) -m compileall -q src

demo: setup bytecode data/corpus/.built
	$(VENV)/bin/pipeline run --config configs/demo.yaml

# the console's browser tests drive Debian's chromium (no browser download): installed with apt when root
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null)) \
	  || echo "could not install chromium: tests/test_console.py will say so"

console: setup
	$(VENV)/bin/pipeline console --runs runs --config configs/demo.yaml

console-screenshots: setup browser
	CONSOLE_SCREENSHOTS=docs/console $(PY) -m pytest tests/test_console.py $(PYTEST_ARGS)

test: setup bytecode browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup bytecode
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-curate: setup  # ~10 minutes on 2 cores; builds its corpus from this machine's text
	$(PY) bench/curate.py --mb 200 --out runs/bench-curate.json

bench-train: setup  # ~12 minutes on 2 cores (3 interleaved repeats)
	$(PY) bench/train.py --steps 40 --out runs/bench-train.json

bench-memory: setup  # ~10 minutes on 2 cores and most of 24 GiB: run it on an otherwise idle machine
	$(PY) bench/memory.py --out runs/bench-memory.json

bench-soak: setup  # ~30 minutes on 2 cores: builds the tiny run itself
	$(PY) bench/soak.py --requests 20000 --steps 2000 --out runs/bench-soak.json

bench-serve: setup  # after `make demo`: dynamic batching on vs off, concurrency 1 and 8
	$(PY) bench/load.py --compare-batching --config configs/demo.yaml --duration 20 --out runs/bench-serve.json

bench-adapters: setup  # after `make demo`: one replica, concurrency 8, 1 adapter vs 8 (mixed batches)
	$(PY) bench/load.py --compare-adapters 8 --config configs/demo.yaml --duration 30 --out runs/bench-adapters.json

clean:
	rm -rf runs data/corpus
