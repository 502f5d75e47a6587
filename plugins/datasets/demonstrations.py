"""Demonstration datasets for SFT: jsonl files, chitchat conversations, saved `datasets` folders, task experts."""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterator, Sequence

from framework.errors import DataError, checked_number
from framework.interfaces import DemonstrationDataset, Task
from framework.records import ROLES, Demonstration
from plugins.datasets.chitchat import conversation_turns, load_conversations
from plugins.datasets.hf_disk import load_saved_dataset
from plugins.datasets.text_files import expand_paths, read_jsonl_rows, validated_rows


def parse_demonstration(row: Any, source: str) -> Demonstration:
    """Validate one row: {"prompt", "response"} (or TRL's {"prompt", "completion"}) or {"messages": [{"role",
    "content"}, ...]}. Raises ValueError."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "completion" in row and "response" not in row:
        row = {**{k: v for k, v in row.items() if k != "completion"}, "response": row["completion"]}
    has_pair = "prompt" in row or "response" in row
    if has_pair and "messages" in row:
        raise ValueError("row has both prompt/response and messages; use one form per row")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{i}].role is {m['role']!r}; expected one of {list(ROLES)}")
            if not isinstance(m["content"], str):
                raise ValueError(f"messages[{i}].content must be a string")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise ValueError("conversation has no non-empty assistant turn to learn from")
        return Demonstration(messages=tuple({"role": m["role"], "content": m["content"]} for m in messages),
                             source=source)
    for key in ("prompt", "response"):
        if key not in row:
            raise ValueError(f"row has no {key!r} field (fields: {sorted(row)}); rows need prompt+response or messages")
        if not isinstance(row[key], str):
            raise ValueError(f"{key!r} must be a string, got {type(row[key]).__name__}")
    if not row["response"].strip():
        raise ValueError("empty response: nothing to learn from")
    return Demonstration(prompt=row["prompt"], response=row["response"], source=source)


class JsonlDemonstrations(DemonstrationDataset):
    """jsonl rows of {"prompt", "response"} or {"messages": [...]}, validated row by row."""

    def __init__(self, paths: Sequence[str] | str, skip_bad_rows: bool = False, max_demonstrations: int | None = None):
        self.paths, self.skip_bad_rows = paths, skip_bad_rows
        self.max_demonstrations = checked_number("dataset.max_demonstrations", max_demonstrations, whole=True,
                                                 at_least=1, allow_none=True, note="null: all of them")

    def _rows(self) -> Iterator[tuple[str, int | None, Any, str | None]]:
        for path in expand_paths(self.paths):
            for lineno, row, problem in read_jsonl_rows(path):
                yield str(path), lineno, row, problem

    def demonstrations(self) -> Iterator[Demonstration]:
        rows = validated_rows(self._rows(), parse_demonstration, self.skip_bad_rows, "demonstration")
        yield from islice(rows, self.max_demonstrations)

    def describe(self) -> str:
        return f"demonstrations from {self.paths}"


class HFDiskDemonstrations(DemonstrationDataset):
    """A saved `datasets` dataset with prompt/response or messages columns."""

    def __init__(self, path: str, split: str = "train", skip_bad_rows: bool = False,
                 max_demonstrations: int | None = None):
        self.path, self.split, self.skip_bad_rows = path, split, skip_bad_rows
        self.max_demonstrations = checked_number("dataset.max_demonstrations", max_demonstrations, whole=True,
                                                 at_least=1, allow_none=True, note="null: all of them")

    def demonstrations(self) -> Iterator[Demonstration]:
        ds = load_saved_dataset(self.path, self.split)
        rows = ((f"{self.path}#{i}", None, row, None) for i, row in enumerate(ds))
        yield from islice(validated_rows(rows, parse_demonstration, self.skip_bad_rows, "demonstration"),
                          self.max_demonstrations)

    def describe(self) -> str:
        return f"saved dataset {self.path} [{self.split}]"


class ChitchatDemonstrations(DemonstrationDataset):
    """Each conversation as a chat, all assistant turns trained. both_sides: each conversation twice, once with
    each speaker as the assistant, so every turn is learnt as (conversation so far -> next turn)."""

    def __init__(self, max_conversations: int | None = None, max_turns: int | None = 8, both_sides: bool = True):
        self.max_conversations, self.max_turns, self.both_sides = max_conversations, max_turns, both_sides

    def demonstrations(self) -> Iterator[Demonstration]:
        n = 0
        for conv_id, conv in load_conversations().items():
            if self.max_conversations is not None and n >= self.max_conversations:
                return
            turns = conversation_turns(conv)[: self.max_turns]
            if len(turns) < 2:
                continue
            n += 1
            for side, roles in enumerate([("user", "assistant"), ("assistant", "user")][: 2 if self.both_sides else 1]):
                messages = tuple({"role": roles[i % 2], "content": t} for i, t in enumerate(turns))
                yield Demonstration(messages=messages, source=f"chitchat:{conv_id}:{side}")

    def describe(self) -> str:
        return "chitchat conversations as demonstrations"


class TaskDemonstrations(DemonstrationDataset):
    """The task expert's responses to `n` task prompts drawn with `seed`."""

    def __init__(self, task: Task, n: int = 1000, seed: int = 0):
        if not isinstance(task, Task):
            raise DataError("dataset=task_demos needs a task: add task=<sort|addition|reasoning_gym>")
        self.task, self.n, self.seed = task, n, seed

    def demonstrations(self) -> Iterator[Demonstration]:
        for prompt in self.task.prompts(self.n, self.seed):
            yield self.task.demonstration(prompt)

    def describe(self) -> str:
        return f"{self.n} expert demonstrations of task {self.task.name}"
