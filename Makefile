# `make demo` and `make test` do all set-up themselves: a virtual environment in .venv with
# torch pinned first (it installs from this machine's disk), then the package in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= runs/demo

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) tools/make_synthetic.py $(DEMO)/celeba --num 2000 --overwrite
	rm -rf $(DEMO)/shards
	$(PY) tools/shard.py $(DEMO)/celeba $(DEMO)/shards --size 64 --shard-size 500
	$(PY) tools/shard.py --verify $(DEMO)/shards

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs data *.egg-info
