# Two commands set everything up on a new machine: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
PYTHON_DOCS_DIR ?= /usr/share/doc/python3.11/html/_sources
INSTALLED := $(VENV)/.installed

.PHONY: demo test test-slow test-all data venv clean

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,export,vision,timm,hf]'
	touch $(INSTALLED)

# The Debian package dataset-fashion-mnist holds the IDX files, python3.11-doc the reference language model's
# corpus (the documentation's reST sources); install them when they are missing.
data:
	@if [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz ] && [ ! -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte ]; then \
	  echo "Fashion-MNIST files missing in $(FASHION_MNIST_DIR); installing dataset-fashion-mnist"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
	    || { echo "could not install it; run: sudo apt-get update && sudo apt-get install dataset-fashion-mnist"; exit 1; }; \
	  else \
	    echo "run: sudo apt-get update && sudo apt-get install dataset-fashion-mnist"; exit 1; \
	  fi; \
	fi
	@if [ ! -f $(PYTHON_DOCS_DIR)/tutorial/index.rst.txt ]; then \
	  echo "Python documentation sources missing in $(PYTHON_DOCS_DIR); installing python3.11-doc"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -q python3.11-doc || (apt-get update -q && apt-get install -y -q python3.11-doc)) >/dev/null \
	    || { echo "could not install it; run: sudo apt-get update && sudo apt-get install python3.11-doc"; exit 1; }; \
	  else \
	    echo "run: sudo apt-get update && sudo apt-get install python3.11-doc"; exit 1; \
	  fi; \
	fi

# `make test` leaves out the long accuracy checks (marked slow); `make test-slow` runs only them, `make test-all`
# both. Extra pytest arguments: make test PYTEST_ARGS='-k config'.
test: venv data
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: venv data
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: test test-slow

demo: venv data
	$(VENV)/bin/ptsparse sparsify --model reference --data fashion-mnist --method recommended --sparsity 0.9 --out runs/demo

clean:
	rm -rf runs .pytest_cache build src/*.egg-info
