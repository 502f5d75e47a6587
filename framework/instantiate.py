"""Checked instantiation of plugins from config nodes: a `_target_` from a file is code, so check it first."""

from __future__ import annotations

import difflib
import importlib
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError

T = TypeVar("T")


def _import_target(path: str, group: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ConfigError(f"{group}._target_={path!r} is not a dotted path; write it as package.module.ClassName")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{group}._target_={path!r}: cannot import module {module_name!r} ({err}). "
            "Check the spelling, or make your module importable (install it, or run from its folder / set PYTHONPATH)."
        ) from err
    try:
        return getattr(module, attr)
    except AttributeError:
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"{group}._target_={path!r}: module {module_name!r} has no {attr!r}.{hint}") from None


def instantiate_plugin(node: DictConfig, group: str, expected: type[T] | tuple[type, ...] | None = None,
                       fix: str | None = None, **kwargs: Any) -> T:
    """Instantiate `node` (which must carry `_target_`), checking that it imports and implements `expected`.

    group: the config path of the node, used in every message (e.g. "dataset", "stage").
    expected: the group's contract, or a tuple of the contracts a group accepts (`algo`: online or offline).
    fix: what to do instead, said when the target is not of the contract (default: subclass it).
    kwargs: late-bound arguments passed through to the constructor.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ConfigError(f"config group {group!r} has no `_target_`; pick an option ({group}=...) or set {group}._target_")
    target = _import_target(str(node._target_), group)
    contracts = " or ".join(f"{c.__module__}.{c.__name__}" for c in _contracts(expected))
    if expected is not None and isinstance(target, type) and not issubclass(target, expected):
        raise ConfigError(f"{group}._target_={node._target_!r} is not a {contracts}; " + (
            fix or f"plugins of the {group!r} group subclass that contract (see framework/interfaces.py)"))
    try:
        obj = instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        keys = sorted(k for k in OmegaConf.to_container(node, resolve=False) if k != "_target_")
        hint = ""
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            # `group._target_=x` on the command line keeps the keys of the option it replaces
            hint = (f". If they are another option's keys ({group}._target_= keeps them), start a node of your own: "
                    f"'~{group}' '+{group}={{_target_: {node._target_}}}' (and your keys inside the braces)")
        raise ConfigError(f"{group}: cannot build {node._target_} with keys {keys}: {cause or err}{hint}") from err
    if expected is not None and not isinstance(obj, expected):
        raise ConfigError(f"{group}._target_={node._target_!r} returned {type(obj).__name__}, not a {contracts}"
                          + (f"; {fix}" if fix else ""))
    return obj


def _contracts(expected: type | tuple[type, ...] | None) -> tuple[type, ...]:
    return () if expected is None else expected if isinstance(expected, tuple) else (expected,)
