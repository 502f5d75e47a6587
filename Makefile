# Two commands do all the set-up (see README): `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the local CPU wheel on our machines; without the pin pip would pull a multi-GB CUDA build.
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt
PYTEST_ARGS ?=

.PHONY: install quickstart test test-slow test-compat bench config-reference clean

$(BIN)/rlhf: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e ".[dev]"
	@$(BIN)/python -c "import shutil, torch; print('torch', torch.__version__); assert not torch.version.cuda or shutil.which('nvidia-smi'), 'a CUDA build of torch was installed on a machine without a GPU: install with -c constraints.txt'"
	@touch $(BIN)/rlhf

install: $(BIN)/rlhf

# the whole recipe: pretrain -> sft -> reward_model -> rl -> eval (about 7 minutes on 2 CPU cores: docs/quickstart.md)
quickstart: install
	$(BIN)/rlhf pipeline=chatgpt

# --durations: the 15 slowest tests at the end, to keep the default suite within its ~15 minutes (slower: -m slow)
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# the oldest transformers that pyproject.toml allows, in a venv of its own: the tests of models, tokenizers, the
# reward export and the RL stage's module (1 min 14 s from a fresh clone, install included); .ci/run runs it after
# `make test`
COMPAT_VENV ?= .venv-compat
TRANSFORMERS_OLDEST := $(shell sed -n 's/^ *"transformers>=\([0-9.]*\)",.*/\1/p' pyproject.toml)
COMPAT_TESTS := tests/test_models.py tests/test_tokenizer.py tests/test_reward.py tests/test_rl_stage.py \
	tests/test_rl_math.py tests/test_algorithms.py

test-compat:
	@test -n "$(TRANSFORMERS_OLDEST)" || { echo "no transformers>=X.Y lower bound found in pyproject.toml"; exit 1; }
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q --upgrade pip
	$(COMPAT_VENV)/bin/pip install -q -c constraints.txt "transformers==$(TRANSFORMERS_OLDEST).*" -e ".[dev]"
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

bench: install
	$(BIN)/python benchmarks/pretrain_throughput.py

# regenerate docs/config-reference.md from the comments in conf/ (tests/test_docs.py fails when it is stale)
config-reference: install
	$(BIN)/python -m framework.config_reference > docs/config-reference.md

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info
