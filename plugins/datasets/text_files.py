"""Local text files: .txt/.md documents and .jsonl rows, given as paths or globs."""

from __future__ import annotations

import codecs
import glob
import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from framework.errors import DataError
from framework.interfaces import TextDataset
from framework.records import Text

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}

T = TypeVar("T")


def expand_paths(patterns: Sequence[str] | str) -> list[Path]:
    """Expand paths/globs (sorted, de-duplicated); each pattern must match at least one file."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise DataError("dataset.paths is empty; give files or globs, e.g. dataset.paths='[data/*.txt]'")
    files: list[Path] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        matches = [m for m in matches if Path(m).is_file() or not glob.has_magic(expanded)]
        if not matches or not all(Path(m).exists() for m in matches):
            raise DataError(f"no file matches {pattern!r} (working directory: {Path.cwd()})")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                raise DataError(f"{pattern!r} is a directory; use a glob such as '{pattern}/**/*.txt'")
            if p not in files:
                files.append(p)
    return files


def read_jsonl_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line number, parsed row, problem) for each non-blank line; problem is None or says why it is bad.

    A UTF-8 byte order mark (Windows editors write one) is skipped. A file whose first line opens a JSON array is
    one JSON document, not JSON Lines: that raises a DataError, also under skip_bad_rows, which would drop it all."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, None, f"not UTF-8 text ({err.reason} at byte {err.start})"
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                row, problem = None, f"invalid JSON ({err.msg})"
            else:
                problem = None
            if lineno == 1 and line.lstrip().startswith("["):
                raise DataError(f"{problem + '; ' if problem else ''}the file starts a JSON array, expected one "
                                "JSON object per line (JSON Lines): write each element on its own line, e.g. "
                                "`jq -c '.[]' in.json > out.jsonl`", str(path), lineno)
            yield lineno, row, problem


def read_jsonl_field(path: Path, field: str, skip_bad_rows: bool) -> Iterator[tuple[int, str]]:
    """Yield (line number, value of `field`) for each non-blank row; bad rows raise DataError or are counted."""
    skipped = 0
    for lineno, row, problem in read_jsonl_rows(path):
        if problem is None:
            if not isinstance(row, dict):
                problem = f"expected a JSON object, got {type(row).__name__}"
            elif field not in row:
                problem = f"row has no {field!r} field (fields: {sorted(row)}); set dataset.text_field"
            elif not isinstance(row[field], str):
                problem = f"field {field!r} is {type(row[field]).__name__}, expected a string"
        if problem is None:
            yield lineno, row[field]
        elif skip_bad_rows:
            skipped += 1
        else:
            raise DataError(problem + " (add dataset.skip_bad_rows=true to skip such rows)", str(path), lineno)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} bad row(s) (dataset.skip_bad_rows=true)", stacklevel=2)


def validated_rows(rows: Iterable[tuple[str, int | None, Any, str | None]], parse: Callable[[Any, str], T],
                   skip_bad_rows: bool, what: str = "row") -> Iterator[T]:
    """Parse rows, raising DataError at the first bad one or (skip_bad_rows) skipping bad ones with one warning.

    rows: (path, 1-based line or None, parsed row, problem found while reading it or None).
    parse(row, source) returns the record or raises ValueError saying what is wrong; source is "path:line" (or path).
    what: the kind of row, for the warning ("skipped 2 bad demonstration row(s)").
    """
    skipped, first = 0, ""
    for path, line, row, problem in rows:
        source = f"{path}:{line}" if line else path
        try:
            if problem:
                raise ValueError(problem)
            record = parse(row, source)
        except ValueError as err:
            if not skip_bad_rows:
                raise DataError(f"{err} (add dataset.skip_bad_rows=true to skip such rows)", path, line) from None
            skipped += 1
            first = first or f"{source}: {err}"
            continue
        yield record
    if skipped:
        warnings.warn(f"skipped {skipped} bad {what} row(s) (dataset.skip_bad_rows=true); the first: {first}",
                      stacklevel=2)


class TextFiles(TextDataset):
    """.txt/.md files are documents (or blank-line-separated blocks); .jsonl rows give `text_field`."""

    def __init__(
        self,
        paths: Sequence[str] | str,
        text_field: str = "text",
        split_on_blank_lines: bool = True,
        skip_bad_rows: bool = False,
        max_documents: int | None = None,
    ):
        self.paths = paths
        self.text_field = text_field
        self.split_on_blank_lines = split_on_blank_lines
        self.skip_bad_rows = skip_bad_rows
        self.max_documents = max_documents

    def _documents(self) -> Iterator[Text]:
        for path in expand_paths(self.paths):
            suffix = path.suffix.lower()
            if suffix in JSONL_SUFFIXES:
                for lineno, text in read_jsonl_field(path, self.text_field, self.skip_bad_rows):
                    if text.strip():
                        yield Text(text, source=f"{path}:{lineno}")
            elif suffix in TEXT_SUFFIXES:
                try:
                    content = path.read_text(encoding="utf-8-sig")  # -sig: without a byte order mark
                except UnicodeDecodeError as err:
                    raise DataError(f"not UTF-8 text ({err})", str(path)) from None
                blocks = re.split(r"\n\s*\n", content) if self.split_on_blank_lines else [content]
                for block in blocks:
                    if block.strip():
                        yield Text(block.strip(), source=str(path))
            else:
                raise DataError(
                    f"unsupported file type {suffix!r}; use {sorted(TEXT_SUFFIXES | JSONL_SUFFIXES)}", str(path)
                )

    def texts(self) -> Iterator[Text]:
        for i, doc in enumerate(self._documents()):
            if self.max_documents is not None and i >= self.max_documents:
                return
            yield doc

    def describe(self) -> str:
        return f"text files {self.paths}"
