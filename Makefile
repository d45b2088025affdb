# `make install` then `make test` on a fresh machine; see README.md.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= data
SHARED_DATA ?= ../shared/data

.PHONY: install data test test-fast lint train bench clean

install:  ## virtual environment with the project and its dev tools
	$(PY) -m venv $(VENV)
	# (pip's warnings about local index folders it cannot read are noise on machines without them; --no-cache-dir:
	# the venv alone takes about 6.2 GB with the CUDA build of torch, so no second copy of the downloads is kept)
	set -o pipefail; $(BIN)/pip install -q --no-cache-dir -e '.[dev]' 2>&1 | { grep -v "is ignored" || true; }
	$(BIN)/python -c "import torch, torchvision, pytorch_lightning, hydra, faiss; print('installed torch', torch.__version__)"

data:  ## build CIFAR-10's python layout from the offline JPEG copy (no network needed)
	@if [ -f $(DATA_DIR)/cifar-10-batches-py/test_batch ]; then echo "CIFAR-10 already built in $(DATA_DIR)"; \
	elif [ -f $(SHARED_DATA)/build_cifar10.py ]; then $(BIN)/python $(SHARED_DATA)/build_cifar10.py $(DATA_DIR); \
	else echo "no offline copy at $(SHARED_DATA); real-data tests will be skipped (or train with data.download=true)"; fi

test: data  ## the whole suite (real-data tests skip with a reason when the data is absent)
	$(BIN)/python -m pytest -q --durations=10

test-fast:
	$(BIN)/python -m pytest -q -x -m "not slow"

lint:
	$(BIN)/ruff check src tests benchmarks

train:  ## the headline experiment
	$(BIN)/python -m src.train experiment=magnet_cifar10

bench:
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/magnet_speed.py

clean:
	rm -rf outputs .pytest_cache
