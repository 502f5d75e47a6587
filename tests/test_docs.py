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


def test_config_reference_takes_help_from_where_a_key_is_defined(tmp_path):
    """A key without a comment shows the help of its definition: in an experiment, the option of its group that the
    experiment picks (or an option it picks picks, or the root config); in an option that extends another of its
    group, that one's. Never a sibling option's: `batch_size` means another thing in each stage."""
    from framework.config_reference import render

    conf = tmp_path / "conf"
    for name, text in {
        "config.yaml": "defaults:\n  - _self_\n  - stage: a\nseed: 0   # the seed\n",
        "stage/a.yaml": "defaults:\n  - override /data@_global_.data: big\nbatch_size: 8   # prompts per batch\n",
        "stage/b.yaml": "batch_size: 4\n",
        "stage/c.yaml": "defaults:\n  - a\nbatch_size: 2\n",
        "data/big.yaml": "n: 10   # rows read\n",
        "data/small.yaml": "n: 1\n",
        "experiment/x.yaml": "# @package _global_\ndefaults:\n  - override /stage: b\nstage:\n  batch_size: 3\nseed: 1\n",
        "experiment/y.yaml": "# @package _global_\ndefaults:\n  - override /stage: a\nstage:\n  batch_size: 5\n"
                             "data:\n  n: 7\n",
    }.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text)
    sections = {s.split("\n", 1)[0]: s for s in render(conf).split("### ")}
    assert "| `batch_size` | `4` |  |" in sections["`stage=b`"]  # not a's "prompts per batch"
    assert "| `batch_size` | `2` | prompts per batch |" in sections["`stage=c`"]  # c extends a
    assert "| `n` | `1` |  |" in sections["`data=small`"]
    assert "| `stage.batch_size` | `3` |  |" in sections["`experiment=x`"]  # x picks stage b
    assert "| `seed` | `1` | the seed |" in sections["`experiment=x`"]
    assert "| `stage.batch_size` | `5` | prompts per batch |" in sections["`experiment=y`"]
    assert "| `data.n` | `7` | rows read |" in sections["`experiment=y`"]  # y picks stage a, which picks data big
