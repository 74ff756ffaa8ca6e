# One entry for the two things a fresh machine needs: a demo render and the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/freescale-render: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch lies on disk here; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# libtiff's tools decode our TIFFs independently in the tests (Debian package; needs root).
	command -v tiffcp >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get install -y -qq libtiff-tools || (apt-get update -qq && apt-get install -y -qq libtiff-tools)) >/dev/null; } || true
	# `ip` (iproute2) makes the network namespaces of the multi-host tests (tests/test_hosts.py; needs root).
	command -v ip >/dev/null || { [ "$$(id -u)" = 0 ] && (apt-get install -y -qq iproute2 || (apt-get update -qq && apt-get install -y -qq iproute2)) >/dev/null; } || true
	# promtool and a Prometheus server for the monitoring tests, unpacked from Debian's package (no service started).
	tools/fetch_prometheus.sh $(VENV)/prometheus
	touch $@

install: $(BIN)/freescale-render

demo: install
	mkdir -p out
	$(BIN)/freescale-render --model toy --prompt "an orange creature" --seed 7 --size 1024x1024 --steps 20 --save-stages --preview --out out/demo.tif

test: install
	$(BIN)/python -m pytest -q

.PHONY: install demo test
