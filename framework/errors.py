"""User-facing errors: each says what is wrong and how to fix it, and the CLI prints it without a traceback."""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable


class RLHFError(Exception):
    """A problem with the user's input or environment (config, data, paths, servers), not a bug.

    echoed_by_rank: set on an error that every process of a data-parallel run raised together, with the same
    message, to this process's rank: the command prints it once, from rank 0."""

    echoed_by_rank: int | None = None


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


def range_words(at_least=None, above=None, below=None, at_most=None) -> str:
    """'in [0, 1)', '> 0', '>= 1', ... for a range given by its optional bounds."""
    start = f"[{at_least}" if at_least is not None else f"({above}" if above is not None else None
    end = f"{below})" if below is not None else f"{at_most}]" if at_most is not None else None
    if start and end:
        return f"in {start}, {end}"
    return (f">= {at_least}" if at_least is not None else f"> {above}" if above is not None
            else f"< {below}" if below is not None else f"<= {at_most}")


def checked_number(key: str, value: Any, whole: bool = False, at_least: float | None = None,
                   above: float | None = None, below: float | None = None, at_most: float | None = None,
                   note: str = "", default: Any = None, allow_none: bool = False) -> Any:
    """`value` of the setting `key` as an int (`whole`) or a float, or a ConfigError naming the key: not a finite
    number (booleans and strings are not), a fraction where a whole number is needed, or outside the range given by
    the optional bounds (>= at_least or > above; < below or <= at_most). `note` ends the message of a value out of
    range (what 0 means, an example); `default` is named in the message of a value of the wrong kind. None passes
    when `allow_none`."""
    if value is None and allow_none:
        return None
    told = f" (default {default})" if default is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is not a finite number{told}")
    if whole and value != int(value):
        raise ConfigError(f"{key}={value!r} must be a whole number{told}")
    value = int(value) if whole else float(value)
    if ((at_least is not None and value < at_least) or (above is not None and value <= above)
            or (below is not None and value >= below) or (at_most is not None and value > at_most)):
        raise ConfigError(f"{key}={value:g} must be {range_words(at_least, above, below, at_most)}"
                          + (f" ({note})" if note else ""))
    return value


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
