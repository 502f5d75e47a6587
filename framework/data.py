"""Data plumbing shared by stages: deterministic hash splits and sequence packing (pure functions)."""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")


def hash_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, key): the same document lands in the same split on every machine."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(items: Iterable[T], val_fraction: float, seed: int, key: Callable[[T], str]) -> tuple[list[T], list[T]]:
    """Split by a seeded hash of each item's key, not by position: reordering the input never moves an item.

    Returns (train, val). If the hash puts nothing in val but there are >= 2 items and val_fraction > 0, the item
    with the smallest hash goes to val, so validation is never silently empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    scored = [(hash_fraction(key(it), seed), it) for it in items]
    train = [it for h, it in scored if h >= val_fraction]
    val = [it for h, it in scored if h < val_fraction]
    if not val and val_fraction > 0 and len(scored) >= 2:
        smallest = min(range(len(scored)), key=lambda i: scored[i][0])
        val = [scored[smallest][1]]
        train = [it for i, (_, it) in enumerate(scored) if i != smallest]
    return train, val


def pack_token_stream(docs: Sequence[Sequence[int]], eos_id: int, seq_len: int) -> list[list[int]]:
    """Concatenate documents, each followed by EOS, and cut the stream into blocks of exactly `seq_len` tokens.

    The last partial block is dropped. Returns a list of blocks; with `labels = input_ids` a causal LM then learns
    to predict across document boundaries only through the EOS it has just seen.
    """
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    stream: list[int] = []
    for ids in docs:
        stream.extend(ids)
        stream.append(eos_id)
    n = len(stream) // seq_len
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]
