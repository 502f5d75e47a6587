# Two commands do all the set-up (see README): `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the local CPU wheel on our machines; without the pin pip would pull a multi-GB CUDA build.
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt
PYTEST_ARGS ?=

.PHONY: install quickstart test test-slow bench config-reference clean

$(BIN)/rlhf: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e ".[dev]"
	@$(BIN)/python -c "import shutil, torch; print('torch', torch.__version__); assert not torch.version.cuda or shutil.which('nvidia-smi'), 'a CUDA build of torch was installed on a machine without a GPU: install with -c constraints.txt'"
	@touch $(BIN)/rlhf

install: $(BIN)/rlhf

# the whole recipe: pretrain -> sft -> reward_model -> rl -> eval (about 15 minutes on 2 CPU cores)
quickstart: install
	$(BIN)/rlhf pipeline=chatgpt

test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/pretrain_throughput.py

# regenerate docs/config-reference.md from the comments in conf/ (tests/test_docs.py fails when it is stale)
config-reference: install
	$(BIN)/python -m framework.config_reference > docs/config-reference.md

clean:
	rm -rf $(VENV) build *.egg-info
