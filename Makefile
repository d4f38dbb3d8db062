# The two commands of README.md: `make demo` runs a local swarm, `make test` runs the suite.
# Each creates the virtual environment it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard src/apiary/*/protos/*.proto)

.PHONY: demo test bench proto images clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# A pinned torch is taken from the local wheel cache where one exists (CPU build, no download).
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[ml,dev,transformers]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/apiary up --peers 4 --duration 90

test: $(STAMP)
	$(PY) -m tests.tools.ensure_redis
	$(PY) -m pytest -q --durations=15

bench: $(STAMP)
	$(PY) benchmarks/wire.py

# Regenerates the protobuf modules next to their .proto files (they are committed).
proto: $(STAMP)
	cd src && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. $(PROTOS:src/%=%)

# The four service images (one target each of services/Dockerfile), tagged with the package's
# version (latest: an alias), as compose.yaml names them; the trainer and the expert server in the
# variant of APIARY_DEVICE (cpu or cuda).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
APIARY_IMAGE_PREFIX ?= apiary
APIARY_DEVICE ?= cpu
DOCKER ?= docker

images:
	for service in dht averager; do \
		$(DOCKER) build -f services/Dockerfile --target $$service -t $(APIARY_IMAGE_PREFIX)/$$service:$(VERSION) \
			-t $(APIARY_IMAGE_PREFIX)/$$service:latest . || exit 1; \
	done
	for service in expert-server trainer; do \
		$(DOCKER) build -f services/Dockerfile --target $$service --build-arg DEVICE=$(APIARY_DEVICE) \
			-t $(APIARY_IMAGE_PREFIX)/$$service:$(VERSION)-$(APIARY_DEVICE) \
			-t $(APIARY_IMAGE_PREFIX)/$$service:latest-$(APIARY_DEVICE) . || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache
