# Two commands for a newcomer: `make run` (the whole system on this machine) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# CPU machines get the pinned CPU-friendly torch; GPU users may pass their own, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/acestep-serverless dev

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	$(BIN)/python benchmarks/queue_throughput.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .acestep
