"""Checked instantiation of plugins from config nodes: a `_target_` from a file is code, so check it first."""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
import types
import typing
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


# annotations whose values are checked before a plugin is built (a `stage.batch_size=abc` typo otherwise fails
# inside the constructor with "'<' not supported between 'str' and 'int'", naming no key)
_NUMBER_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false"}


@functools.cache
def _number_parameters(target: type) -> dict[str, frozenset[str]]:
    """{parameter: the kinds it takes} for the parameters of `target`'s constructor annotated with int, float or
    bool only (and None): `int | None`, `float`, `Optional[int]`, ... Others (strings, mappings, unions with other
    types, unreadable annotations) are not checked here."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return {}
    kinds = {}
    for name, parameter in parameters.items():
        annotation = parameter.annotation
        if annotation is inspect.Parameter.empty:
            continue
        if not isinstance(annotation, str):
            # only a union is unpacked: tuple[float, float] or list[int] is a sequence, not a number
            union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
            args = typing.get_args(annotation) if union else (annotation,)
            annotation = " | ".join("None" if a is type(None) else getattr(a, "__name__", "?") for a in args)
        annotation = annotation.replace("typing.", "")
        if annotation.startswith("Optional[") and annotation.endswith("]"):
            annotation = annotation[len("Optional["):-1] + " | None"
        names = frozenset(part.strip() for part in annotation.split("|"))
        if names & _NUMBER_KINDS.keys() and names <= {*_NUMBER_KINDS, "None"}:
            kinds[name] = names | ({"None"} if parameter.default is None else set())  # `n: int = None`
    return kinds


def _check_number_values(node: DictConfig, group: str, target: type, given: Any) -> dict[str, int]:
    """Refuse, by key, a value of the wrong kind for a constructor parameter annotated as a number or a flag (but
    those the caller gives itself, `given`, which replace the node's). Returns the whole numbers written as floats
    for int parameters (`trainer.max_steps=1e4`), as ints, for the constructor."""
    whole = {}
    for name, kinds in _number_parameters(target).items():
        if name not in node or name in given:
            continue
        try:
            value = node[name]
        except Exception:  # an interpolation that only resolves where the plugin is built: not ours to judge here
            continue
        if value is None and "None" in kinds:
            continue
        if isinstance(value, bool):
            ok = "bool" in kinds
        elif isinstance(value, int):
            ok = bool(kinds & {"int", "float"})
        elif isinstance(value, float):
            ok = "float" in kinds or ("int" in kinds and value.is_integer())
            if ok and "float" not in kinds:
                whole[name] = int(value)
        else:
            ok = False
        if not ok:
            wanted = " or ".join(_NUMBER_KINDS[k] for k in ("int", "float", "bool") if k in kinds
                                 and not (k == "int" and "float" in kinds))
            raise ConfigError(f"{group}.{name}={value!r} must be {wanted}" + (" (or null)" if "None" in kinds else ""))
    return whole


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
    if isinstance(target, type):
        kwargs = {**_check_number_values(node, group, target, kwargs), **kwargs}
    try:
        obj = instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        keys = sorted(k for k in OmegaConf.to_container(node, resolve=False) if k != "_target_")
        hint = ""
        if isinstance(cause, TypeError) and "unexpected keyword argument" in str(cause):
            # `group._target_=x` on the command line keeps the keys of the option it replaces, and an experiment
            # overlay sets keys of the option it expects (experiment=smoke: tokenizer.vocab_size)
            name = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
            drop = f"drop it with '~{group}.{name.group(1)}', or " if name and name.group(1) in keys else ""
            hint = (f". If they are another option's keys (an experiment's, or the option {group}._target_= "
                    f"replaced), {drop}start a node of your own: '~{group}' '+{group}={{_target_: {node._target_}}}' "
                    "(and your keys inside the braces)")
        raise ConfigError(f"{group}: cannot build {node._target_} with keys {keys}: {cause or err}{hint}") from err
    if expected is not None and not isinstance(obj, expected):
        raise ConfigError(f"{group}._target_={node._target_!r} returned {type(obj).__name__}, not a {contracts}"
                          + (f"; {fix}" if fix else ""))
    return obj


def _contracts(expected: type | tuple[type, ...] | None) -> tuple[type, ...]:
    return () if expected is None else expected if isinstance(expected, tuple) else (expected,)
