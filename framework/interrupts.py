"""Ctrl-C that stops training at a step boundary instead of wherever Python happens to be.

A bare KeyboardInterrupt can land inside a tracking-store write (an SQLite transaction, an HTTP request to the
MLflow server) and leave the run's store in a state where even marking the run KILLED fails. While a Lightning
fit/validate loop runs, the first Ctrl-C is therefore only recorded; `StopOnInterrupt` raises KeyboardInterrupt
at the next batch boundary, where Lightning's own interrupt handling (and our `exception_checkpoint`) takes over.
A second Ctrl-C, or one outside a training loop, interrupts at once as usual.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator


class _State:
    installed = False
    deferring = 0  # > 0 while a loop that checks `requested` at each batch boundary is running
    requested = False


def _on_sigint(signum: int, frame: Any) -> None:
    if _State.deferring and not _State.requested:
        _State.requested = True
        print("\n[rlhf] Ctrl-C: stopping at the end of this batch and saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)
        return
    raise KeyboardInterrupt


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Install the Ctrl-C handler for the duration of a stage (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread() or _State.installed:
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _State.installed, _State.requested = True, False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _State.installed, _State.deferring, _State.requested = False, 0, False


def request_stop() -> None:
    """What the first Ctrl-C does, callable from code (tests, a watchdog)."""
    _State.requested = True


def stop_callback():
    """A Lightning callback that turns a recorded Ctrl-C into KeyboardInterrupt at a batch boundary. Under DDP the
    decision is all-reduced each batch so that every rank stops at the same step."""
    from pytorch_lightning import Callback

    class StopOnInterrupt(Callback):
        def _enter(self, *args: Any) -> None:
            _State.deferring += 1

        def _leave(self, *args: Any) -> None:
            _State.deferring = max(0, _State.deferring - 1)

        on_fit_start = on_validation_start = _enter
        on_fit_end = on_validation_end = _leave

        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            _State.deferring = 0

        def on_train_batch_end(self, trainer, *args: Any) -> None:
            stop = _State.requested
            if trainer.world_size > 1:  # every rank runs the same number of training batches
                stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if stop:
                _State.requested = False
                from framework.distributed import raised_everywhere

                raise raised_everywhere(KeyboardInterrupt())  # every process decided it together

        def on_validation_batch_end(self, trainer, *args: Any) -> None:
            if _State.requested and trainer.world_size == 1:  # ranks may hold unequal validation shards
                _State.requested = False
                raise KeyboardInterrupt

    return StopOnInterrupt()
