"""The Chit Chat Challenge corpus (package `chitchat-dataset`, MIT): 7,168 real conversations, one document each."""

from __future__ import annotations

import json
from typing import Iterator

from framework.errors import DataError
from framework.interfaces import TextDataset
from framework.records import Text


def load_conversations() -> dict:
    """{conversation_id: {"messages": [[{"text", "sender", ...}, ...], ...]}} from the installed package."""
    try:
        import chitchat_dataset
    except ImportError:
        raise DataError("dataset=chitchat needs the `chitchat-dataset` package: pip install chitchat-dataset") from None
    path = getattr(chitchat_dataset, "_PATH", None)
    if path is None:
        raise DataError("the installed chitchat-dataset package has no bundled dataset.json (expected version 0.9)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def conversation_turns(conversation: dict) -> list[str]:
    """One string per turn: a turn is consecutive messages by one speaker, joined by spaces."""
    turns = []
    for turn in conversation["messages"]:
        text = " ".join(m["text"].strip() for m in turn if m.get("text", "").strip())
        if text:
            turns.append(text)
    return turns


class ChitchatCorpus(TextDataset):
    """Each conversation becomes one document: its turns, one per line, in order."""

    def __init__(self, max_documents: int | None = None):
        self.max_documents = max_documents

    def texts(self) -> Iterator[Text]:
        for i, (conv_id, conv) in enumerate(load_conversations().items()):
            if self.max_documents is not None and i >= self.max_documents:
                return
            turns = conversation_turns(conv)
            if turns:
                yield Text("\n".join(turns), source=f"chitchat:{conv_id}")

    def describe(self) -> str:
        cap = f", first {self.max_documents}" if self.max_documents else ""
        return f"chitchat conversations (chitchat-dataset package{cap})"
