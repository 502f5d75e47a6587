"""Shared test helpers: run the real CLI (in a subprocess, or in this process for commands that stop before training)
with an isolated RLHF_HOME, read runs back from MLflow."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false"]


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory) -> Path:
    """One tokenizer cache for the whole session, so each corpus/settings pair is trained once."""
    return tmp_path_factory.mktemp("tokenizer-cache")


@pytest.fixture
def rlhf_home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def cli_env(home: Path, cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(RLHF_HOME=str(home), RLHF_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture
def run_cli(rlhf_home: Path, tokenizer_cache: Path):
    """run_cli(*overrides, env=None, check=True) -> CompletedProcess of `python -m framework ...`."""

    def _run(*args: str, env: dict | None = None, check: bool = True, timeout: int = 600):
        proc = subprocess.run(
            [sys.executable, "-m", "framework", *args],
            cwd=REPO, env={**cli_env(rlhf_home, tokenizer_cache), **(env or {})},
            capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"rlhf {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    return _run


@pytest.fixture
def run_cli_here(rlhf_home: Path, tokenizer_cache: Path, monkeypatch):
    """run_cli_here(*overrides, check=True, timeout=120) -> the CompletedProcess `run_cli` would give, from the same
    `main()` run in this process. For commands that stop before training (a config or input error): they take
    ~0.3 s here against ~9 s in a fresh interpreter, which spends most of that importing torch, Lightning and MLflow.
    A run that trains belongs in `run_cli` (its own process: threads, seeds, logging), and so does a command that
    needs an environment variable read at start-up (threads, PYTHONPATH): there is no `env=` here.
    The exit code and the messages are the CLI's: `sys.exit(2)` with "error: ..." for a user error, 1 and the
    traceback for an exception. Python warnings go to pytest's recorder, not to stderr; Hydra's logging set-up
    closes the handlers that were open (a `pytest --log-file` stops there)."""
    import signal
    import traceback

    from framework.cli import main

    def _run(*args: str, check: bool = True, timeout: int = 120):
        full = {k: v for k, v in cli_env(rlhf_home, tokenizer_cache).items() if not k.startswith("HYDRA_")}
        out, err = io.StringIO(), io.StringIO()
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        environ, rng = dict(os.environ), _rng_states()
        code = 0
        with monkeypatch.context() as patch:
            os.environ.clear()
            os.environ.update(full)
            patch.setattr(sys, "argv", ["rlhf", *args])
            patch.chdir(REPO)

            def too_long(*_):
                raise TimeoutError(f"rlhf {' '.join(args)} ran past {timeout} s in the test process")

            previous = signal.signal(signal.SIGALRM, too_long)
            signal.alarm(timeout)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    main()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            except Exception:  # Hydra re-raises instead of exiting 1 under a tracer (coverage, a debugger)
                traceback.print_exc(file=err)
                code = 1
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
                # what the run changes for the process: the environment (the seed Lightning sets), the RNGs, and the
                # root logger's handlers (Hydra's job logging adds a file in the run dir)
                os.environ.clear()
                os.environ.update(environ)
                _rng_states(rng)
                for handler in root.handlers:
                    if handler not in handlers:
                        handler.close()
                root.handlers[:] = handlers
                root.setLevel(level)
        proc = subprocess.CompletedProcess(["rlhf", *args], code, out.getvalue(), err.getvalue())
        if check and code != 0:
            raise AssertionError(f"rlhf {' '.join(args)} failed ({code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    return _run


def _rng_states(states: tuple | None = None) -> tuple:
    """The states of Python's, NumPy's and torch's RNGs; given states, set them back."""
    import random

    import numpy as np
    import torch

    if states is not None:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def exported_dir(stdout: str, what: str = "model") -> Path:
    """The directory a stage printed as its export ("exported model + tokenizer to ...")."""
    match = re.search(rf"exported {what} \+ tokenizer to (\S+)", stdout)
    assert match, stdout[-2000:]
    return Path(match.group(1))


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, tokenizer_cache):
    """A smoke-pretrained model, then chat-format SFT on chitchat conversations from it (model.path).
    Returns (home, pretrained dir, sft dir, the SFT CompletedProcess); shared by the SFT and reward-model tests."""
    home = tmp_path_factory.mktemp("chat-home")

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "framework", *args], cwd=REPO, env=cli_env(home, tokenizer_cache),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc

    pretrained = exported_dir(cli("experiment=smoke", "trainer.max_steps=60", *QUIET).stdout)
    sft = cli("stage=sft", f"model.path={pretrained}", "dataset.max_conversations=300", "stage.max_length=128",
              "stage.batch_size=8", "trainer.max_steps=40", "trainer.val_check_interval=20", *QUIET)
    return home, pretrained, exported_dir(sft.stdout), sft


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A byte-level BPE of 400 tokens (with the chat template) trained on 200 chitchat documents."""
    from plugins.datasets.chitchat import ChitchatCorpus
    from plugins.tokenizers.bpe import ByteLevelBPETrainer

    corpus = [t.text for t in ChitchatCorpus(max_documents=200).texts()]
    return ByteLevelBPETrainer(vocab_size=400).build(corpus, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory, tokenizer) -> str:
    """An untrained 1-layer policy with the BPE tokenizer (and its chat template), exported as a stage exports one:
    for the tests that need a model dir but not a trained one (eval, chat)."""
    import torch

    from framework.models import CausalLMFactory
    from framework.stages.common import export_causal_lm

    torch.manual_seed(0)
    lm = CausalLMFactory(arch="gpt2", n_layer=1, n_head=2, n_embd=32, n_positions=128).build(tokenizer)
    return str(export_causal_lm(lm, tokenizer, tmp_path_factory.mktemp("policy")))


def mlflow_runs(home: Path, experiment: str = "rlhf-lab"):
    """All runs of `experiment` in the default local store under `home` (newest first)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home.resolve() / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} under {home}"
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
