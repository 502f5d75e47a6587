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


def help_index(conf: Path) -> dict[str, str]:
    """{global dotted key: help} from every file, so that a key set again elsewhere (an experiment, a pipeline)
    shows the help of its definition."""
    index: dict[str, str] = {}
    paths = sorted(conf.rglob("*.yaml"), key=lambda p: ("@package _global_" in p.read_text(), str(p)))
    for path in paths:  # definitions first, then the _global_ files (experiments, pipelines) that set them again
        text = path.read_text()
        group = path.parent.relative_to(conf).as_posix()
        prefix = "" if "@package _global_" in text or group == "." else group.split("/")[0] + "."
        for key, value in comments(text)[1].items():
            index.setdefault(prefix + key, value)
    return index


def describe_file(path: Path, title: str, index: dict[str, str], prefix: str = "") -> list[str]:
    text = path.read_text()
    header, helps = comments(text)
    data = yaml.safe_load(text) or {}
    glob = "@package _global_" in text
    if glob:
        prefix = ""
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
        lines += [f"| `{k}` | {show(v)} | {escape(key_help(k, helps, index, prefix))} |" for k, v in rows]
        lines.append("")
    return lines


def key_help(key: str, helps: dict[str, str], index: dict[str, str], prefix: str) -> str:
    """The key's own comment, else its definition's, else its parent's (a one-key mapping), else a stock text."""
    parent = key.rsplit(".", 1)[0] if "." in key else None
    text = helps.get(key) or index.get(prefix + key) or (helps.get(parent) if parent else None)
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
            lines += describe_file(option, f"`{name}={option.stem}`", index, name.split("/")[0] + ".")
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
