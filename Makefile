# The two commands a new user runs: `make serve` and `make test`. Both create and reuse .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/gptserve/v1/*.proto)

.PHONY: serve test bench install protos clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml $(PROTOS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,test]'
	$(MAKE) protos
	touch $@

# The gRPC stubs are generated, never edited: gptserve/v1/*_pb2*.py.
protos:
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

serve: $(INSTALLED)
	$(BIN)/gptserve serve --model smollm2-135m-instruct --metrics-port 9464

test: $(INSTALLED)
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) gptserve/v1
