"""Preference datasets for reward modelling: pairwise and K-wise comparison rows from jsonl files or saved datasets.

Row kinds (one kind per file; extra fields are ignored, a null field counts as absent):
  pairwise  {"prompt", "chosen", "rejected"}, optional "margin" (preference strength) and "gold_chosen" +
            "gold_rejected" (hidden gold scores, both or neither);
  K-wise    {"prompt", "responses": [K >= 2 texts], "ranking": [response indices, best first]}, optional "gold":
            [one number per response] (InstructGPT style).
"""

from __future__ import annotations

import math
import numbers
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

from framework.errors import DataError
from framework.interfaces import ComparisonContext, ComparisonDataset
from framework.records import Ranking
from plugins.datasets.hf_disk import load_saved_dataset
from plugins.datasets.text_files import expand_paths, read_jsonl_rows, validated_rows

Row = tuple[str, int | None, Any, str | None]  # (path, 1-based line or None, parsed row, problem or None)
PAIRWISE_FIELDS = ("chosen", "rejected")
KWISE_FIELDS = ("responses", "ranking")
CONVERSATIONAL = ("conversational (list-of-messages) preference rows are not supported: flatten the prompt and "
                  "each response to text")


def _present(row: dict, keys: Iterable[str]) -> list[str]:
    return [k for k in keys if row.get(k) is not None]


def row_kind(row: Any) -> str | None:
    """"pairwise" or "K-wise" from the fields a row has; None when it is not an object or has neither or both."""
    if not isinstance(row, dict):
        return None
    pairwise, kwise = _present(row, PAIRWISE_FIELDS), _present(row, KWISE_FIELDS)
    if pairwise and not kwise:
        return "pairwise"
    if kwise and not pairwise:
        return "K-wise"
    return None


def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        raise ValueError(f"{name} is a {type(value).__name__}, not a string: {CONVERSATIONAL}")
    raise ValueError(f"{name} must be a string, got {type(value).__name__}")


def _response(value: Any, name: str) -> str:
    text = _text(value, name)
    if not text.strip():
        raise ValueError(f"{name} is empty: an empty response teaches nothing")
    return text


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def parse_comparison(row: Any, source: str) -> Ranking:
    """Validate one pairwise or K-wise row (see the module docstring) into a Ranking. Raises ValueError."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    pairwise, kwise = _present(row, PAIRWISE_FIELDS), _present(row, KWISE_FIELDS)
    if pairwise and kwise:
        raise ValueError("row has both pairwise (chosen/rejected) and K-wise (responses/ranking) fields; "
                         "use one form per row")
    if not pairwise and not kwise:
        raise ValueError(f"row has neither chosen+rejected nor responses+ranking (fields: {sorted(row)}); "
                         "preference rows are {prompt, chosen, rejected} or {prompt, responses, ranking}")
    kind_fields = PAIRWISE_FIELDS if pairwise else KWISE_FIELDS
    for key in ("prompt", *kind_fields):
        if row.get(key) is None:
            kind = "pairwise" if pairwise else "K-wise"
            raise ValueError(f"{kind} row has no {key!r} field (fields: {sorted(row)}); it needs "
                             f"{' + '.join(('prompt', *kind_fields))}")
    prompt = _text(row["prompt"], "'prompt'")
    return (_pairwise if pairwise else _kwise)(row, prompt, source)


def _pairwise(row: dict, prompt: str, source: str) -> Ranking:
    chosen, rejected = _response(row["chosen"], "'chosen'"), _response(row["rejected"], "'rejected'")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are identical: identical responses teach nothing")
    if row.get("gold") is not None:
        raise ValueError("pairwise rows give gold scores as 'gold_chosen' and 'gold_rejected', not 'gold'")
    margin = None if row.get("margin") is None else _number(row["margin"], "'margin'")
    golds = _present(row, ("gold_chosen", "gold_rejected"))
    if len(golds) == 1:
        missing = "gold_rejected" if golds == ["gold_chosen"] else "gold_chosen"
        raise ValueError(f"row has {golds[0]!r} but no {missing!r}; give both gold scores or neither")
    gold = None
    if golds:
        gold = (_number(row["gold_chosen"], "'gold_chosen'"), _number(row["gold_rejected"], "'gold_rejected'"))
    return Ranking.pair(prompt, chosen, rejected, source=source, gold=gold, margin=margin)


def _kwise(row: dict, prompt: str, source: str) -> Ranking:
    responses, ranking = row["responses"], row["ranking"]
    if isinstance(responses, str) or not isinstance(responses, (list, tuple)):
        raise ValueError(f"'responses' must be a list of strings, got {type(responses).__name__}")
    if len(responses) < 2:
        raise ValueError(f"a K-wise row needs at least 2 responses to rank, got {len(responses)}")
    texts = tuple(_response(r, f"responses[{i}]") for i, r in enumerate(responses))
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        if text in seen:
            raise ValueError(f"responses[{seen[text]}] and responses[{i}] are identical: rank distinct responses")
        seen[text] = i
    k = len(texts)
    expected = f"a permutation of 0..{k - 1} (indices into 'responses', best first), e.g. {list(range(k))}"
    if (not isinstance(ranking, (list, tuple)) or len(ranking) != k
            or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in ranking)
            or sorted(int(i) for i in ranking) != list(range(k))):
        raise ValueError(f"'ranking' must be {expected}; got {ranking!r}")
    for key in ("margin", "gold_chosen", "gold_rejected"):
        if row.get(key) is not None:
            raise ValueError(f"{key!r} belongs to pairwise rows; a K-wise row gives gold scores as 'gold' "
                             "(one per response) and has no margin")
    gold = None
    if row.get("gold") is not None:
        values = row["gold"]
        if isinstance(values, str) or not isinstance(values, (list, tuple)) or len(values) != k:
            raise ValueError(f"'gold' must be a list of {k} numbers (one per response, in 'responses' order), "
                             f"got {values!r}")
        gold = tuple(_number(v, f"gold[{i}]") for i, v in enumerate(values))
    return Ranking(prompt, texts, tuple(int(i) for i in ranking), source=source, gold=gold)


def one_kind(rows: Iterable[Row]) -> Iterator[Row]:
    """Pass rows through, raising DataError (also under skip_bad_rows) when pairwise and K-wise rows are mixed."""
    first: tuple[str, str] | None = None  # (kind, source) of the first row that has a kind
    for path, line, row, problem in rows:
        kind = None if problem else row_kind(row)
        source = f"{path}:{line}" if line else path
        if kind is not None:
            if first is None:
                first = (kind, source)
            elif kind != first[0]:
                raise DataError(
                    f"this row is {kind} but {first[1]} is {first[0]}: a file mixes pairwise and K-wise rows. "
                    "Put each kind in its own file, or write pairwise rows as K-wise ones "
                    '({"prompt": ..., "responses": [chosen, rejected], "ranking": [0, 1]})', path, line)
        yield path, line, row, problem


class JsonlComparisons(ComparisonDataset):
    """jsonl rows, all pairwise or all K-wise per file (see the module docstring), validated row by row."""

    needs_policy = False

    def __init__(self, paths: Sequence[str] | str, skip_bad_rows: bool = False, limit: int | None = None):
        self.paths, self.skip_bad_rows, self.limit = paths, skip_bad_rows, limit

    def _rows(self) -> Iterator[Row]:
        for path in expand_paths(self.paths):
            yield from one_kind((str(path), lineno, row, problem) for lineno, row, problem in read_jsonl_rows(path))

    def comparisons(self, ctx: ComparisonContext | None = None) -> Iterator[Ranking]:
        yield from islice(validated_rows(self._rows(), parse_comparison, self.skip_bad_rows, "comparison"), self.limit)

    def describe(self) -> str:
        return f"comparisons from {self.paths}"


class SavedComparisons(ComparisonDataset):
    """A saved `datasets` dataset with prompt/chosen/rejected or prompt/responses/ranking columns."""

    needs_policy = False

    def __init__(self, path: str, split: str = "train", skip_bad_rows: bool = False, limit: int | None = None):
        self.path, self.split, self.skip_bad_rows, self.limit = path, split, skip_bad_rows, limit

    def comparisons(self, ctx: ComparisonContext | None = None) -> Iterator[Ranking]:
        ds = load_saved_dataset(self.path, self.split)
        rows = one_kind((f"{self.path}[{self.split}]#{i}", None, row, None) for i, row in enumerate(ds))
        yield from islice(validated_rows(rows, parse_comparison, self.skip_bad_rows, "comparison"), self.limit)

    def describe(self) -> str:
        return f"comparisons from saved dataset {self.path} [{self.split}]"
