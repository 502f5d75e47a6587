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
