# The two set-up commands of the README. Each starts from nothing but Python 3.10+.
#   make demo   create .venv, install; FP report, W8A8 bundle and its report for shapes-unet
#   make test   create .venv, install, run lint, type checks and the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := out/demo

.PHONY: demo test test-slow install clean

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
	$(BIN)/diffkiln optimize shapes-unet --recipe w8a8 --out $(DEMO)/shapes-unet-w8a8 --overwrite
	$(BIN)/diffkiln report $(DEMO)/shapes-unet-w8a8 --eval-size 50 --out $(DEMO)/report-shapes-unet-w8a8
	@echo "open $(DEMO)/report-shapes-unet/report.html and $(DEMO)/report-shapes-unet-w8a8/report.html"

test: $(STAMP)
	$(BIN)/python -m ruff check diffkiln tests tools
	$(BIN)/python -m mypy diffkiln
	# Two workers: the CI machine's two cores (most of an export is single-threaded Python). A whole
	# module per worker (loadscope): a module's fixtures (bundles, exports) are built once, not on
	# both; modules in collection order, the longest first (tests/conftest.py).
	$(BIN)/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

# The checks too slow for CI (e.g. compiling FlexAttention on CPU: a minute or two from cold).
test-slow: $(STAMP)
	DIFFKILN_SLOW=1 $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
