"""The docs cannot rot: every `rlhf ...` command in a ```bash block of README.md and docs/*.md composes (its config
groups, options and keys exist; `rlhf chat` / `rlhf compare` flags parse), and docs/config-reference.md is what
`python -m framework.config_reference` generates. Commands that train are run for real by the e2e tests."""

import re
import shlex

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDER = "/tmp/rlhf-docs-placeholder"


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for each rlhf command line in a bash block, continuation lines joined."""
    found = []
    for doc in DOCS:
        in_bash, pending = False, ""
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_bash = line.strip() in ("```bash", "```sh") and not in_bash
                continue
            if not in_bash:
                continue
            text = pending + line.strip()
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            if re.match(r"^(rlhf|rlhf-compare)(\s|$)", text):
                found.append((f"{doc.relative_to(REPO)}:{number}", text))
    return found


COMMANDS = documented_commands()


def first_of_sweeps(overrides: list[str]) -> list[str]:
    """A sweep `key=a,b` becomes `key=a`: composing checks the first job of every documented sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for text, o in zip(overrides, parsed):
        out.append(f"{text.split('=', 1)[0]}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else text)
    return out


def test_the_docs_have_commands():
    assert len(COMMANDS) > 40
    assert any("pipeline=chatgpt" in c for _, c in COMMANDS) and any(c.startswith("rlhf compare") for _, c in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_composes(where, command):
    from hydra import compose, initialize_config_module

    args = shlex.split(re.sub(r"<[^<>]+>", PLACEHOLDER, command), comments=True)
    program, args = args[0], args[1:]
    if program == "rlhf-compare" or args[:1] == ["compare"]:
        from framework.compare import parse_args

        parse_args(args[1:] if args[:1] == ["compare"] else args)
        return
    if args[:1] == ["chat"]:
        from framework.chat import parse_args

        parse_args(args[1:])
        return
    if any(a.startswith(("hydra.searchpath", "'hydra.searchpath")) for a in args):
        pytest.skip("reads a config group from the user's own folder")
    overrides = [a for a in args if not a.startswith("--") and a not in ("job", "hydra")]
    with initialize_config_module(config_module="rlhf_conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=first_of_sweeps(overrides))
    assert cfg.stage.name


def test_config_reference_is_up_to_date():
    from framework.config_reference import render

    assert (REPO / "docs" / "config-reference.md").read_text() == render(), \
        "docs/config-reference.md is stale: run `make config-reference`"
