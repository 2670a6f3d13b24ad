# The two set-up commands of the README. Each starts from nothing but Python 3.10+.
#   make demo   create .venv, install, run the main job on a built-in model
#   make test   create .venv, install, run lint, type checks and the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := out/demo

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pinned: a plain `torch` pulls several GB of CUDA packages; 2.13.0 is the CPU build here.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/diffkiln models
	$(BIN)/diffkiln generate shapes-unet --out $(DEMO)/images \
		--prompt "a red circle on the left" --prompt "a blue square left of a yellow triangle"
	$(BIN)/diffkiln report shapes-unet --out $(DEMO)/report-shapes-unet
	@echo "open $(DEMO)/report-shapes-unet/report.html"

test: $(STAMP)
	$(BIN)/python -m ruff check diffkiln tests tools
	$(BIN)/python -m mypy diffkiln
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
