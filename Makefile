# trtflow — every target sets itself up: a fresh clone needs only python3 (>= 3.11) and make.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install run up down test test-unit test-gpu e2e browser-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

## run: start trtflow locally (Prefect server, work pools, deployments, workers, a local bucket)
run: up
up: $(STAMP)
	$(BIN)/trtflow up

down: $(STAMP)
	$(BIN)/trtflow down

## browser-deps: Debian's Chromium + ChromeDriver for the UI test (root only; skipped otherwise)
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "browser-deps: could not install chromium; the browser test will skip"; \
	else echo "browser-deps: not root; the browser test will skip unless chromium is installed"; fi

## test: everything that runs without a GPU (GPU tests skip with their reason)
test: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not e2e and not browser"

## test-gpu: on a GPU worker: TRT_PYTHON=/opt/trt/bin/trt-python make test-gpu
test-gpu:
	$${TRT_PYTHON:?set TRT_PYTHON to the interpreter with tensorrt} -m pytest -q tests/gpu

e2e: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q tests -m "e2e or browser"

clean:
	rm -rf $(VENV) .pytest_cache .trtflow
