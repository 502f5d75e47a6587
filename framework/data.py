"""Data plumbing shared by stages: deterministic hash splits, sequence packing, lists as datasets."""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Generic, Iterable, Sequence, TypeVar

T = TypeVar("T")


class ListDataset(Generic[T]):
    """A list as a map-style dataset (what a DataLoader needs: __len__ and __getitem__)."""

    def __init__(self, items: Sequence[T]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> T:
        return self.items[i]


class LengthGroupedSampler:
    """Shuffled indices whose batches hold items of similar length, so they pad less (transformers'
    `group_by_length`): shuffle, cut into mega-batches of `mega` batches, sort each by length (longest first), then
    shuffle the order of the full batches (a short last batch stays last). Reshuffled by `set_epoch`, or, with
    `epoch_of` (e.g. the trainer's current epoch; None: not known), by whatever epoch it gives: under DDP
    Lightning wraps this sampler in its DistributedSamplerWrapper, whose set_epoch reaches the sampler only from
    Lightning 2.6.1."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega: int = 50,
                 epoch_of: Callable[[], int | None] | None = None):
        self.lengths, self.batch_size, self.seed, self.mega = list(lengths), batch_size, seed, mega
        self.epoch, self.epoch_of = 0, epoch_of

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        epoch = self.epoch_of() if self.epoch_of is not None else None
        epoch = self.epoch if epoch is None else epoch
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.mega
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(full)
        short = [b for b in batches if len(b) < self.batch_size]
        return iter([i for b in full + short for i in b])


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
        smallest = min(h for h, _ in scored)  # with every copy of it: a duplicate must not train what validates
        if any(h != smallest for h, _ in scored):
            val = [it for h, it in scored if h == smallest]
            train = [it for h, it in scored if h != smallest]
    return train, val


def split_records(records: Sequence[T], val_fraction: float, seed: int,
                  heldout: Sequence[T] | None = None) -> tuple[list[T], list[T]]:
    """Train and validation records: a dataset's own held-out set when it has one, else `hash_split` keyed by each
    record's content (`split_key()`: a Demonstration's text, a Ranking's prompt and responses in any order), never
    by where it was read from. So moving or renaming a data file, or adding rows above a record, moves no record
    between the splits, and identical records land on the same side (a duplicate cannot validate what it trained
    on)."""
    if heldout is not None:
        return list(records), list(heldout)
    return hash_split(records, val_fraction, seed, key=lambda r: r.split_key())


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
