# `make test`: fresh machine -> venv with the package and its test extras -> pytest (CPU only).
# `make demo`: fresh machine -> venv -> Fashion-MNIST -> train the default Bi-Real config on CPU.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
LARQ_VENV ?= .venv-larq

.PHONY: test demo venv data clean larq-env sysdeps

# torch (converter tests) is pinned to the CPU wheel first: unpinned, pip picks the CUDA build.
venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $@

# Fashion-MNIST's four IDX files from Debian where apt exists; elsewhere tfds downloads them.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)); \
	else echo "no Debian package here: tfds will download Fashion-MNIST"; fi

# g++ and oneDNN's headers: bireal_jax builds its CPU kernels against them on first use
# (bireal_jax/ops/cpu/build.py); without them `auto` has fewer candidates (XLA's own ops remain).
sysdeps:
	@if [ -f /usr/include/dnnl.hpp ] && command -v g++ >/dev/null 2>&1; then echo "oneDNN + g++: present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y g++ libdnnl-dev || (apt-get update && apt-get install -y g++ libdnnl-dev) \
	   || echo "could not install g++/libdnnl-dev: XLA's own convolutions will be used"); \
	else echo "no apt here: install a C++ compiler and oneDNN headers for the fast CPU convolutions"; fi

# larq-zoo (the converter test's peer) imports only with TF < 2.17 and Keras 2: own venv; with
# Larq Compute Engine for bench_peers' LCE row.
larq-env: $(LARQ_VENV)/.installed
$(LARQ_VENV)/.installed:
	$(PYTHON) -m venv $(LARQ_VENV)
	$(LARQ_VENV)/bin/python -m pip install larq larq-zoo larq-compute-engine "tensorflow-cpu<2.17" \
	  "tf-keras<2.17"
	touch $@

test: venv sysdeps data larq-env
	XLA_FLAGS="--xla_force_host_platform_device_count=8 $$XLA_FLAGS" $(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

demo: venv sysdeps data
	$(PY) -m bireal_jax.main --config=configs/fashion_mnist.py --workdir=$(WORKDIR)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
