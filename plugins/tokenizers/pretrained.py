"""Load an existing tokenizer from a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from framework.interfaces import TokenizerSource
from framework.tokenization import load_tokenizer


class PretrainedTokenizer(TokenizerSource):
    trains = False

    def __init__(self, path: str):
        self.path = path

    def build(self, corpus: Sequence[str], cache_dir: Path):
        return load_tokenizer(self.path)
