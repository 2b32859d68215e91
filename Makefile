# Two commands on a fresh machine: `make demo` (extract + distill on the embedded
# default) and `make test`. The first target run creates .venv and installs into it.
#
# Real models:  make extract TEACHER=Qwen/Qwen2.5-14B DATA=train.jsonl DEVICE=cuda STORE=stores/qwen14b
#               make distill STUDENT=Qwen/Qwen2.5-1.5B STORE=stores/qwen14b DEVICE=cuda RUN=runs/qwen

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

TEACHER ?= embedded-teacher
STUDENT ?= embedded-student
DEVICE ?= auto
FORMAT ?= safetensors
DTYPE ?= auto
STORE ?= stores/embedded
RUN ?= runs/embedded
EXTRACT_ARGS ?=
DISTILL_ARGS ?=
SWEEP ?= runs/ablation
REMEDIES ?= runs/remedies
TOPK_STORE ?= stores/embedded-topk
TOPK ?= 20
SWEEP_ARGS ?=
EVAL_DATA ?= data/gsm8k-mini/heldout.jsonl
EVAL_ARGS ?=
BENCH_ARGS ?=

# The embedded problems come with their own held-out file and a shard size that
# shows sharding on a small store; a DATA= of your own uses --heldout-fraction.
ifeq ($(origin DATA), undefined)
DATA := data/gsm8k-mini/train.jsonl
HELDOUT ?= data/gsm8k-mini/heldout.jsonl
SHARD_MB ?= 64
endif
SHARD_MB ?= 1024
ifeq ($(origin STUDENT), file)
CONFIG ?= distill/configs/embedded.yaml
endif
CONFIG ?= distill/configs/default.yaml

.PHONY: install extract distill demo ablation remedies eval test bench bench-smoke clean help

help:
	@echo "make demo      extract + distill on the embedded default (CPU, a few minutes)"
	@echo "make extract   run the teacher once, write the KV store to STORE=$(STORE)"
	@echo "make distill   train the student from STORE into RUN=$(RUN)"
	@echo "make ablation  nine-run ablation on STORE into SWEEP=$(SWEEP) (CPU: about 15 min on the embedded store)"
	@echo "make remedies nine anti-collapse and control runs on a store with top-k log-probabilities, into REMEDIES=$(REMEDIES)"
	@echo "make eval      GSM8K accuracy of RUN=$(RUN) on EVAL_DATA=$(EVAL_DATA)"
	@echo "make test      run the test suite"
	@echo "make bench     run every benchmark (about 10 min on 2 CPU cores) and rewrite docs/benchmarks.md"
	@echo "make bench-smoke  run every benchmark at tiny sizes (check that they run); report in build/"
	@echo "make clean     remove stores, runs and build outputs (keeps .venv)"

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

extract: $(STAMP)
	$(PY) -m extract --teacher $(TEACHER) --data $(DATA) $(if $(HELDOUT),--heldout $(HELDOUT)) \
		--out $(STORE) --device $(DEVICE) --format $(FORMAT) --dtype $(DTYPE) --shard-mb $(SHARD_MB) $(EXTRACT_ARGS)

distill: $(STAMP)
	$(PY) -m distill --config $(CONFIG) --store $(STORE) --student $(STUDENT) --out $(RUN) \
		--device $(DEVICE) $(if $(findstring --resume,$(DISTILL_ARGS)),,--overwrite) $(DISTILL_ARGS)

demo: extract distill

# Projector x loss grid plus hybrid and beta variants: see distill/configs/ablation.yaml.
ablation: $(STAMP)
	$(PY) -m distill sweep distill/configs/ablation.yaml --store $(STORE) --out $(SWEEP) --device $(DEVICE) $(SWEEP_ARGS)

# Anti-collapse remedies and controls, on a store that also holds the teacher's top-k
# log-probabilities for the logit-distillation runs.
remedies: $(STAMP)
	$(PY) -m extract --teacher $(TEACHER) --data $(DATA) $(if $(HELDOUT),--heldout $(HELDOUT)) \
		--out $(TOPK_STORE) --device $(DEVICE) --format $(FORMAT) --dtype $(DTYPE) --shard-mb $(SHARD_MB) \
		--topk-logprobs $(TOPK) $(EXTRACT_ARGS)
	$(PY) -m distill sweep distill/configs/remedies.yaml --store $(TOPK_STORE) --out $(REMEDIES) --device $(DEVICE) $(SWEEP_ARGS)

eval: $(STAMP)
	$(PY) -m distill eval-gsm8k --student $(RUN) --data $(EVAL_DATA) --device $(DEVICE) $(EVAL_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

bench-smoke: $(STAMP)
	$(PY) -m bench.run --smoke --out build/bench-smoke.md $(BENCH_ARGS)

clean:
	rm -rf stores runs build .pytest_cache
