# Two commands set everything up on a new machine: `make demo` and `make test`. Both are idempotent.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
INSTALLED := $(VENV)/.installed

.PHONY: demo test data venv clean

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,export,vision,timm,hf]'
	touch $(INSTALLED)

# The Debian package dataset-fashion-mnist holds the IDX files; install it when they are missing.
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

test: venv data
	$(PY) -m pytest -q

demo: venv data
	$(VENV)/bin/ptsparse sparsify --model reference --data fashion-mnist --sparsity 0.9 --out runs/demo
	$(VENV)/bin/ptsparse report runs/demo

clean:
	rm -rf runs .pytest_cache build src/*.egg-info
