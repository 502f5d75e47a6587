"""User-facing errors: each says what is wrong and how to fix it, and the CLI prints it without a traceback."""

from __future__ import annotations

import difflib
from typing import Iterable


class RLHFError(Exception):
    """A problem with the user's input or environment (config, data, paths, servers), not a bug."""


class ConfigError(RLHFError):
    """A config value that cannot work (unknown key, bad path, wrong type)."""


def refuse_unknown_keys(section: str, keys: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise a ConfigError naming each of `keys` that is not in `allowed` as `<section>.<key>`, with the allowed keys
    and the closest of them: a mapping read with `.get()` would otherwise silently ignore a misspelt `+key=` override.

    section: the config path of the mapping, e.g. "kl" or "stage.optimizer".
    """
    allowed = sorted(allowed)
    unknown = [str(k) for k in keys if k not in allowed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, allowed, n=1)
        hints.append(f"{section}.{key}" + (f" (did you mean {section}.{close[0]}?)" if close else ""))
    raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: {section} takes "
                      f"{', '.join(allowed)}; fix the spelling or remove the override")


class DataError(RLHFError):
    """Bad input data; the message names the file and, for row formats, the 1-based line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class TrackingError(RLHFError):
    """The MLflow tracking store cannot be reached or written."""


class ExpertError(RLHFError):
    """An expert cannot label a state; the message names the task (or teacher) and the state."""
