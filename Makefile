# The two commands a new user runs: `make serve` and `make test`. Both create and reuse .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/gptserve/v1/*.proto)

# make serve's settings; empty ones are left to gptserve's own defaults (`gptserve serve --help`).
MODEL ?=
PORT ?=
HTTP_PORT ?=
METRICS_PORT ?= 9464
SERVING := $(VENV)/.installed-serve

.PHONY: serve test test-deps lint typecheck bench install clean

# Installing builds the gRPC stubs gptserve/v1/*_pb2*.py from protos/ (setup.py): editing a .proto reinstalls.
install: $(INSTALLED)

$(INSTALLED): pyproject.toml setup.py $(PROTOS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,test]'
	touch $@

# What serving needs, and the export extra for --model's first export: not the test extra.
$(SERVING): pyproject.toml setup.py $(PROTOS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export]'
	touch $@

serve: $(SERVING)
	$(BIN)/gptserve serve $(if $(MODEL),--model $(MODEL)) $(if $(PORT),--port $(PORT)) \
	    $(if $(HTTP_PORT),--http-port $(HTTP_PORT)) $(if $(METRICS_PORT),--metrics-port $(METRICS_PORT))

test: test-deps lint typecheck
	$(BIN)/pytest -q

lint: $(INSTALLED)
	$(BIN)/ruff check .

# mypy reads a tree of links that puts each top-level folder where it installs (gptserve/model -> model, ...):
# it does not follow pyproject's package-dir.
typecheck: $(INSTALLED)
	rm -rf build/typecheck && mkdir -p build/typecheck/gptserve
	for path in gptserve/*; do ln -s "$$PWD/$$path" build/typecheck/gptserve/; done
	for folder in model export service bench; do ln -s "$$PWD/$$folder" build/typecheck/gptserve/$$folder; done
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p gptserve

# checkov scans the Kubernetes manifests (tests/deploy/test_kubernetes.py) from a venv of its own: it pins
# packaging, boto3 and dozens more that must not move the project's own pins.
CHECKOV_VERSION := 3.3.30
CHECKOV_INSTALLED := build/checkov/.installed-$(CHECKOV_VERSION)

$(CHECKOV_INSTALLED):
	rm -rf build/checkov
	$(PYTHON) -m venv build/checkov
	build/checkov/bin/pip install --quiet --disable-pip-version-check "checkov==$(CHECKOV_VERSION)"
	touch $@

# System packages the tests use: nginx for the load-balancer test (tests/deploy). Installed only where missing,
# never prompting (CI has no stdin); without root or password-less sudo, or without apt, that test skips instead.
test-deps: $(CHECKOV_INSTALLED)
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "test-deps: nginx is missing and this user cannot install it (no root, no sudo): the load-balancer test will skip"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "test-deps: nginx is missing and there is no apt-get: the load-balancer test will skip"; exit 0; fi; \
	echo "test-deps: installing nginx with apt-get"; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
	&& { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light \
	  || $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx; } \
	|| echo "test-deps: could not install nginx: the load-balancer test will skip"

clean:
	rm -rf $(VENV) build gptserve/v1/*_pb2*
