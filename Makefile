# Two commands for a fresh machine: `make run` and `make test`.
# Everything they need is installed here, into .venv at the repo root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU wheel on this machine; a GPU user installs their own torch build
# first and runs `make install TORCH_SPEC=` (empty: keep what is there; see
# the README's "Installing").
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test test-cluster bench check-bioscan-package clean-outputs

# Every extra: the pipeline (DVC, GX, Ray Train/Data, MLflow), the servers (Ray
# Serve, BentoML, FastAPI) and the tests' tools (pytest, selenium, a SeaweedFS
# binary, uv). The model alone (`import g2p`) needs only `pip install .`.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

# The main job: materialise the data version data.dvc records (dvc pull, or
# synthesise the embedded default where no remote is configured), then run
# the pipeline under one MLflow parent run (ended FAILED if a stage fails).
run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/materialise_data.sh
	export PATH="$(CURDIR)/$(VENV)/bin:$$PATH"; \
	G2P_PIPELINE_RUN_ID=$$($(PY) -m pipelines.tracking begin) || exit 1; export G2P_PIPELINE_RUN_ID; \
	if dvc repro; then $(PY) -m pipelines.tracking end; \
	else rc=$$?; $(PY) -m pipelines.tracking end --status FAILED; exit $$rc; fi

# tests/integration/test_page.py drives Debian's chromium through selenium and
# the system chromedriver (no browser download). Installed with apt-get where
# we are root (or have sudo); otherwise this stops with the command to run.
BROWSER := $(VENV)/.browser
$(BROWSER):
	if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then \
	  command -v chromedriver >/dev/null || { echo "need chromedriver: apt-get install chromium-driver" >&2; exit 1; }; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
	  sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	else echo "the page test needs chromium + chromedriver: apt-get install chromium chromium-driver" >&2; exit 1; fi
	touch $(BROWSER)

test: install $(BROWSER)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

# The official bioscan-dataset package reading a synthetic root, in its own venv
# (torchvision does not install beside the CPU torch wheel): slow the first time.
check-bioscan-package: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -m bioscan_package tests/integration/test_bioscan_package.py

# The pipeline on a two-node Ray cluster (ray start processes) with a SeaweedFS S3 store and an
# MLflow server over HTTP, a killed worker and an S3 outage: tens of minutes, outside `make test`.
test-cluster: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -m cluster tests/integration/test_cluster_pipeline.py

bench: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m benchmarks

clean-outputs:
	rm -rf outputs
