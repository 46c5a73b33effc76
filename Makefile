# `make demo` and `make test` do all set-up themselves: a virtual environment in .venv with
# torch pinned first (it installs from this machine's disk), then the package in editable mode.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= runs/demo

.PHONY: demo test gpu-check gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# synthesize -> shard (JPEG + raw 64x64) -> verify -> train the VAE briefly
# (10 epochs at batch 64: the synthetic set is small) with the fastest loader here; pictures, metrics and weights land in $(DEMO)/vae.
demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(PY) tools/make_synthetic.py $(DEMO)/celeba --num 5000
	$(PY) tools/shard.py $(DEMO)/celeba $(DEMO)/shards --size 64 --shard-size 1000
	$(PY) tools/shard.py --verify $(DEMO)/shards
	$(PY) fastceleba/train.py --model vae --data $(DEMO)/shards --epochs 10 --batch-size 64 --flip --out $(DEMO)/vae

test: $(VENV)/.installed
	$(PY) -m pytest -q

# every GPU path (GPU-only tests, bench/loader.py on cuda, AE/VAE in fp32/fp16/bf16 +- --compile,
# fp16 resume, NCCL on >= 2 GPUs); without a GPU the GPU items are skipped with their reason.
# Writes runs/gpu_check/report.json: attach it to any bug report. GPU_CHECK_FLAGS=--quick for less.
gpu-check: $(VENV)/.installed
	$(PY) bench/gpu_check.py $(GPU_CHECK_FLAGS)

# the wheels a GPU machine without DALI, simplejpeg and webdataset needs (Python 3.12), DALI split
# into <= 60 MiB parts, in .whl/ (ignored by git); the install line is in docs/gpus.md
gpu-wheels:
	PYTHON=$(PYTHON) tools/gpu_wheels.sh .whl

clean:
	rm -rf $(VENV) runs data *.egg-info
