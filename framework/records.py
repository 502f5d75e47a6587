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

    def split_key(self) -> str:
        """What decides its train/validation side: its text."""
        return self.text()


@dataclass(frozen=True)
class Prompt:
    """A prompt from a task or a prompt file. meta carries what the task's gold scorer and expert need."""

    text: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    source: str = ""


@dataclass(frozen=True)
class Ranking:
    """Responses to one prompt, ordered by preference: `order` lists indices into `responses`, best first.

    A pairwise comparison (prompt, chosen, rejected) is a Ranking of two: responses=(chosen, rejected), order=(0, 1).
    gold: the hidden gold score of each response, when the labels were made from one (synthetic labellers); it lets
    metrics judge a reward model against the truth and is never used for training.
    margin: an optional preference strength of a pairwise row (Llama-2 style margin loss).
    """

    prompt: str
    responses: tuple[str, ...]
    order: tuple[int, ...]
    source: str = ""
    gold: tuple[float, ...] | None = None
    margin: float | None = None

    @classmethod
    def pair(cls, prompt: str, chosen: str, rejected: str, source: str = "", gold: tuple[float, float] | None = None,
             margin: float | None = None) -> "Ranking":
        return cls(prompt, (chosen, rejected), (0, 1), source=source, gold=gold, margin=margin)

    @property
    def ranked(self) -> list[str]:
        return [self.responses[i] for i in self.order]

    def pairs(self) -> list[tuple[int, int]]:
        """All C(K, 2) (better, worse) index pairs the ranking implies."""
        return [(self.order[a], self.order[b]) for a in range(len(self.order)) for b in range(a + 1, len(self.order))]

    def text(self) -> str:
        return "\n".join([self.prompt, *self.responses])

    def split_key(self) -> str:
        """What decides its train/validation side: the prompt and its responses in any order, so that the same
        responses ranked both ways (two labellers who disagree) land on one side."""
        return "\n".join([self.prompt, *sorted(self.responses)])
