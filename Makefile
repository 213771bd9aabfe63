# trtflow — every target sets itself up: a fresh clone needs only python3 (>= 3.11) and make.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install run up down test test-unit test-gpu e2e browser-deps clean

# Each step says what it does: on a fresh clone this takes a minute or more, and silence looks like a hang.
$(STAMP): pyproject.toml
	@echo "trtflow: creating the virtualenv $(VENV) (first run only)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "trtflow: updating pip"
	@$(BIN)/python -m pip install -q --upgrade pip
	@echo "trtflow: installing trtflow and its test tools into $(VENV) (Prefect, onnx, onnxruntime, ...; about a minute)"
	@$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@
	@echo "trtflow: installed; the command is $(BIN)/trtflow (or: source $(BIN)/activate)"

install: $(STAMP)

## run: start trtflow locally (Prefect server, work pools, deployments, workers, a local bucket)
##      UP_ARGS="--port 4300 --gpus none" passes options to `trtflow up`
run: up
up: $(STAMP)
	@echo "trtflow: starting the local stack (state in $${TRTFLOW_HOME:-$$HOME/.trtflow}); each step is printed as it starts"
	@$(BIN)/trtflow up $(UP_ARGS)
	@echo ""
	@echo "Run trtflow as $(BIN)/trtflow, or put it on PATH for this shell: source $(BIN)/activate"
	@echo "  e.g. $(BIN)/trtflow status    $(BIN)/trtflow down"

down: $(STAMP)
	$(BIN)/trtflow down

## browser-deps: Debian's Chromium + ChromeDriver for the UI test (root only; skipped otherwise)
browser-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "browser-deps: installing Debian's chromium and chromium-driver with apt-get for the UI test (once; a few minutes)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "browser-deps: could not install chromium; the browser test will skip"; \
	else echo "browser-deps: not root; the browser test will skip unless chromium is installed"; fi

## test: everything that runs without a GPU (GPU tests skip with their reason)
##       TRTFLOW_CPU_THREADS=1: two workers on 2 cores, so ONNX Runtime sessions get one thread that does
##       not spin (its default, a spinning thread per core, competes with the other worker's Prefect stack)
test: $(STAMP) browser-deps
	@echo "trtflow: running the test suite in 2 processes: the e2e tests (Prefect stacks) one at a time in one, unit tests in the other"
	TRTFLOW_CPU_THREADS=1 $(BIN)/python -m pytest -q tests -n 2 --dist loadgroup

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not e2e and not browser"

## test-gpu: on a GPU worker: TRT_PYTHON=/opt/trt/bin/trt-python make test-gpu
test-gpu:
	$${TRT_PYTHON:?set TRT_PYTHON to the interpreter with tensorrt} -m pytest -q tests/gpu

e2e: $(STAMP) browser-deps
	$(BIN)/python -m pytest -q tests -m "e2e or browser"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
