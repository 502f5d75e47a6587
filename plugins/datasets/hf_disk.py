"""A `datasets` Dataset (or DatasetDict) saved with `save_to_disk`, read offline from its folder."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from framework.errors import DataError
from framework.interfaces import TextDataset
from framework.records import Text


def load_saved_dataset(path: str, split: str | None):
    """Load a saved Dataset, picking `split` from a DatasetDict, with errors that name what exists."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError("reading a saved dataset needs the `datasets` package: pip install 'rlhf-lab[datasets]'") from None
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"dataset.path={path!r} is not a folder written by Dataset.save_to_disk")
    try:
        ds = load_from_disk(str(p))
    except FileNotFoundError as err:
        raise DataError(f"{path!r} is not a saved `datasets` dataset ({err})") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path!r} has splits {sorted(ds)}, not {split!r}; set dataset.split")
        ds = ds[split]
    return ds


class HFDiskText(TextDataset):
    def __init__(self, path: str, split: str = "train", text_field: str = "text", max_documents: int | None = None):
        self.path = path
        self.split = split
        self.text_field = text_field
        self.max_documents = max_documents

    def texts(self) -> Iterator[Text]:
        ds = load_saved_dataset(self.path, self.split)
        if self.text_field not in ds.column_names:
            raise DataError(f"no column {self.text_field!r} (columns: {ds.column_names}); set dataset.text_field", self.path)
        for i, value in enumerate(ds[self.text_field]):
            if self.max_documents is not None and i >= self.max_documents:
                return
            if not isinstance(value, str):
                raise DataError(f"row {i}: {self.text_field!r} is {type(value).__name__}, expected a string", self.path)
            if value.strip():
                yield Text(value, source=f"{self.path}#{i}")

    def describe(self) -> str:
        return f"saved dataset {self.path} [{self.split}]"
