# README's two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench clean
setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -m "slow or not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/memory_efficient.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/train_step.py --profile
	$(PY) benchmarks/ray_overhead.py
	$(PY) benchmarks/submit_overhead.py

clean:
	rm -rf .build runs stores .pytest_cache
