"""Byte-level BPE trained here with the `tokenizers` library, cached by corpus hash + settings."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from framework.errors import ConfigError
from framework.interfaces import TokenizerSource
from framework.tokenization import SPECIAL_TOKENS, load_tokenizer, wrap_tokenizer


def corpus_key(corpus: Sequence[str], settings: dict) -> str:
    """sha256 over the settings and every document, in order."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for doc in corpus:
        h.update(doc.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def check_cache_dir(cache_dir: Path, folder: Path) -> None:
    """Create `folder` (under paths.cache_dir) or raise a ConfigError naming paths.cache_dir: a file where a folder
    should be, a folder that cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _first_file(folder) or folder
        raise ConfigError(f"paths.cache_dir={str(cache_dir)!r}: {blocker} is a file, not a folder; set "
                          "paths.cache_dir (or $RLHF_CACHE_DIR) to a folder") from None
    except OSError as err:
        raise ConfigError(f"paths.cache_dir={str(cache_dir)!r}: cannot create {folder} ({err.strerror}); set "
                          "paths.cache_dir (or $RLHF_CACHE_DIR) to a folder you can write") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"paths.cache_dir={str(cache_dir)!r}: cannot write in {folder} (permission denied); set "
                          "paths.cache_dir (or $RLHF_CACHE_DIR) to a folder you can write")


def _first_file(path: Path) -> Path | None:
    """The first existing non-folder on the way down to `path` (a file where a folder should be)."""
    for part in reversed([path, *path.parents]):
        if part.exists() and not part.is_dir():
            return part
    return None


class ByteLevelBPETrainer(TokenizerSource):
    """Train a GPT-2-style byte-level BPE (no unknown tokens) with EOS, PAD and chat-turn special tokens."""

    trains = True

    def __init__(self, vocab_size: int = 4096, min_frequency: int = 2):
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer.vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (the byte alphabet)")
        self.vocab_size = vocab_size
        self.min_frequency = min_frequency
        self.last_trained = False  # True when the last build() trained rather than hit the cache

    def train(self, corpus: Sequence[str]):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # exact char offsets for assistant masks
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
        return wrap_tokenizer(tok)

    def build(self, corpus: Sequence[str], cache_dir: Path):
        settings = {"kind": "byte_level_bpe", "vocab_size": self.vocab_size, "min_frequency": self.min_frequency,
                    "special_tokens": SPECIAL_TOKENS, "version": 2}
        target = Path(cache_dir).expanduser() / "tokenizers" / f"bpe{self.vocab_size}-{corpus_key(corpus, settings)[:20]}"
        if (target / "tokenizer.json").exists():
            self.last_trained = False
            return load_tokenizer(target)
        check_cache_dir(cache_dir, target.parent)  # before training, not after it
        tokenizer = self.train(corpus)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, target)  # atomic: concurrent sweep jobs never see a half-written cache entry
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another job won the race; its result is identical
        self.last_trained = True
        return load_tokenizer(target)
