# `make test`: fresh machine -> venv with the package and its test extras -> pytest (CPU only).
# `make demo`: fresh machine -> venv -> Fashion-MNIST -> train the default Bi-Real config on CPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: test demo venv data clean

venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

# Fashion-MNIST's four IDX files from Debian where apt exists; elsewhere tfds downloads them.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)); \
	else echo "no Debian package here: tfds will download Fashion-MNIST"; fi

test: venv data
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $$XLA_FLAGS" $(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

demo: venv data
	$(PY) -m bireal_jax.main --config=configs/fashion_mnist.py --workdir=$(WORKDIR)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
