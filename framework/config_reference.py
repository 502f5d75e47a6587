"""The flat reference of every config key with its default and help text, generated from conf/ (the comments in the
YAML files are the help text):

    python -m framework.config_reference > docs/config-reference.md      # or: make config-reference
    python -m framework.config_reference --check docs/config-reference.md  # exit 1 when the file is stale
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CONF = Path(__file__).resolve().parents[1] / "conf"
KEY_LINE = re.compile(r"^(\s*)([A-Za-z_][\w.@/-]*|\"[^\"]+\"):(\s|$)(.*)$")
SKIP_TOP = ("defaults", "hydra")


def _inline_comment(rest: str) -> str:
    """The comment after a value, ignoring '#' inside quotes."""
    quote = None
    for i, c in enumerate(rest):
        if c in "'\"" and quote in (None, c):
            quote = None if quote else c
        elif c == "#" and quote is None and (i == 0 or rest[i - 1].isspace()):
            return rest[i + 1 :].strip()
    return ""


def comments(text: str) -> tuple[str, dict[str, str]]:
    """(the file's leading comment block, {dotted key: help}) from the YAML text."""
    header: list[str] = []
    helps: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    seen_key = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if body.startswith("@package"):
                continue
            (pending if seen_key else header).append(body)
            continue
        match = KEY_LINE.match(line)
        if not match:
            if not stripped:
                pending = []
            continue
        seen_key = True
        indent, key = len(match.group(1)), match.group(2).strip('"')
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        text_help = _inline_comment(match.group(4)) or " ".join(pending)
        if text_help:
            helps[dotted] = text_help
        pending = []
    return " ".join(header), helps


def flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict) and node:
        out = []
        for k, v in node.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, node)]


def escape(text: str) -> str:
    return text.replace("|", "\\|")


def show(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value)
    text = escape(text).replace("\n", " ")
    return f"`{text}`" if text else '`""`'


def help_index(conf: Path) -> dict[str, dict[str, str]]:
    """{option: {global dotted key: help}} from every file that defines keys (the root config as "config", a group's
    option as "group/option"), so that a key set again in a `_global_` file (an experiment, a pipeline) shows the
    help of the option that defines it: the one that file picks for the group, else the root config's default."""
    index: dict[str, dict[str, str]] = {}
    for path in sorted(conf.rglob("*.yaml")):
        text = path.read_text()
        if "@package _global_" in text:
            continue
        group = path.parent.relative_to(conf).as_posix()
        prefix = "" if group == "." else group.split("/")[0] + "."
        name = path.stem if group == "." else f"{group}/{path.stem}"
        index[name] = {prefix + key: value for key, value in comments(text)[1].items()}
        index[f"_picks:{name}"] = picked_options(yaml.safe_load(text) or {})  # stage/sft picks a dataset, ...
    return index


def picked_options(data: dict) -> dict[str, str]:
    """{group: option} from a file's `defaults` list (`override /stage: sft` -> stage: sft)."""
    picks = {}
    for entry in data.get("defaults", []) or []:
        if isinstance(entry, dict):
            (key, value), = entry.items()
            if value is not None:
                picks[key.replace("override ", "").lstrip("/").split("@")[0]] = str(value)
    return picks


def definition_help(key: str, index: dict[str, dict[str, str]], picks: dict[str, str]) -> str | None:
    """The help of a `_global_` file's key at its definition: the root config's, else the option of its group that
    is picked (by the file, else by an option it picks, else by the root config)."""
    group = key.split(".", 1)[0]
    effective = dict(index["_picks:config"])
    for picked_group, option in picks.items():
        effective.update(index.get(f"_picks:{picked_group}/{option}", {}))
    effective.update(picks)
    for name in ("config", f"{group}/{effective.get(group)}"):
        text = index.get(name, {}).get(key)
        if text:
            return text
    return None


def describe_file(path: Path, title: str, index: dict[str, dict[str, str]], group: str = "") -> list[str]:
    """group: the option's group ("" for the root config)."""
    text = path.read_text()
    header, helps = comments(text)
    data = yaml.safe_load(text) or {}
    glob = "@package _global_" in text
    picks_of = picked_options(data)
    prefix = group.split("/")[0] + "." if group else ""
    for entry in data.get("defaults", []) or []:  # an option that extends another of its group (trainer/ddp: cpu)
        if isinstance(entry, str) and entry != "_self_" and not glob:
            for key, value in index.get(f"{group}/{entry}", {}).items():
                helps.setdefault(key.removeprefix(prefix), value)
    lines = [f"### {title}", ""]
    if header:
        lines += [header, ""]
    picks = [next(iter(d.items())) for d in data.get("defaults", []) if isinstance(d, dict)]
    if picks:
        chosen = ", ".join(f"`{k.replace('override /', '').split('@')[0]}={'null' if v is None else v}`"
                           for k, v in picks)
        lines += [f"Picks: {chosen}.", ""]
    rows = [(k, v) for top, node in data.items() if top not in SKIP_TOP for k, v in flatten({top: node})]
    if rows:
        where = "keys at the root of the config" if glob else "keys"
        lines += [f"| {where} | default | help |", "|---|---|---|"]
        lines += [f"| `{k}` | {show(v)} | {escape(key_help(k, helps, index, picks_of if glob else None))} |"
                  for k, v in rows]
        lines.append("")
    return lines


def key_help(key: str, helps: dict[str, str], index: dict[str, dict[str, str]], picks: dict[str, str] | None) -> str:
    """The key's own comment, else (in a `_global_` file, `picks` its picked options) its definition's, else its
    parent's (a one-key mapping), else a stock text. A group's option never borrows a sibling option's comment:
    the same key can mean another thing there (`batch_size` of eval is not the reward model's)."""
    parent = key.rsplit(".", 1)[0] if "." in key else None
    text = (helps.get(key) or (definition_help(key, index, picks) if picks is not None else None)
            or (helps.get(parent) if parent else None))
    if text:
        return text
    if key.endswith("_target_"):
        return "the class this option instantiates (any importable class of the right kind works)"
    return ""


def render(conf: Path = CONF) -> str:
    lines = ["# Configuration reference", "",
             "Every config key with its default and help text, generated from the comments in `conf/` by "
             "`python -m framework.config_reference > docs/config-reference.md` (`make config-reference`); "
             "a test fails when this file is stale. Do not edit it by hand.",
             "", "Choose a group's option with `group=option`; set a key with `key=value` "
             "(a group's keys live under its name: `model.n_layer=2`). See [configuration.md](configuration.md).", "",
             "## The root config (`conf/config.yaml`)", ""]
    index = help_index(conf)
    lines += describe_file(conf / "config.yaml", "`config.yaml`", index)[2:]
    for group in sorted(p for p in conf.rglob("*") if p.is_dir() and any(p.glob("*.yaml"))):
        name = group.relative_to(conf).as_posix()
        lines += [f"## Group `{name}`", ""]
        for option in sorted(group.glob("*.yaml")):
            lines += describe_file(option, f"`{name}={option.stem}`", index, name)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if argv[:1] == ["--check"]:
        target = Path(argv[1] if len(argv) > 1 else "docs/config-reference.md")
        if not target.is_file() or target.read_text() != text:
            print(f"{target} is stale: regenerate it with `python -m framework.config_reference > {target}`",
                  file=sys.stderr)
            return 1
        print(f"{target} is up to date")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
