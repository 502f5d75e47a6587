"""Record types that dataset plugins yield and stages consume. Plain dataclasses: no torch, no tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Text:
    """One raw-text document for language-model pretraining.

    source: where it came from ("path:line", a package name, ...), used in error messages and provenance.
    """

    text: str
    source: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Demonstration:
    """What a good policy does: a prompt and its response, or a whole conversation (`messages`).

    messages: tuple of {"role": "system"|"user"|"assistant", "content": str}; every assistant turn is trained.
    """

    prompt: str | None = None
    response: str | None = None
    messages: tuple[dict, ...] | None = None
    source: str = ""

    def as_messages(self) -> list[dict]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}, {"role": "assistant", "content": self.response or ""}]

    def text(self) -> str:
        """All of its text, for training a tokenizer."""
        return "\n".join(m["content"] for m in self.as_messages())


@dataclass(frozen=True)
class Prompt:
    """A prompt from a task or a prompt file. meta carries what the task's gold scorer and expert need."""

    text: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    source: str = ""
