"""Sort T symbols: the horizon T is a knob. The expert knows the best next symbol from any prefix."""

from __future__ import annotations

import random
import string
from collections import Counter

from framework.errors import ExpertError
from framework.interfaces import Task
from framework.records import Prompt

# symbols in ASCII order, so that "sorted" means the same to Python, to the reader and to a byte-level tokenizer
ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase


class SortDigits(Task):
    """Prompt "sort: 3 1 2 =", response " 1 2 3" (separator " "), or "sort: 312 =" -> "123" (separator "").

    With separator "" and a byte-level vocabulary every symbol is one token, so the horizon is T + 1 actions.
    `digits` is the alphabet size: 10 draws decimal digits, up to 62 adds A-Z then a-z (ASCII order).
    `distinct=true` draws T different symbols (needs digits >= T), so that "not yet emitted" is a set question.

    Expert from any prefix (also a wrong one), by `recovery`:
    - "positional" (default): the sorted input's digits at the following positions, then stop: after a mistake the
      rest of the answer is still right where it stands (the fewest further digit errors; labels stay consistent
      with the sorted pattern, which a small model can learn from its own mistakes).
    - "multiset": the digits not yet emitted, smallest first (a digit emitted out of order is used up, one not in
      the input is ignored): the output's multiset ends right, but after a skipped digit the expert asks for it
      again at every later state, labels that contradict the sorted order and are hard to learn.
    Gold: 1.0 when the emitted digits are exactly the sorted input, else 0.0.
    """

    RECOVERY = ("positional", "multiset")

    def __init__(self, length: int = 8, digits: int = 10, separator: str = " ", recovery: str = "positional",
                 distinct: bool = False):
        if recovery not in self.RECOVERY:
            raise ValueError(f"task.recovery must be one of {self.RECOVERY}")
        self.recovery = recovery
        if length < 1 or not 2 <= digits <= len(ALPHABET):
            raise ValueError(f"task.length must be >= 1 and task.digits in [2, {len(ALPHABET)}]")
        if distinct and digits < length:
            raise ValueError(f"task.distinct=true draws {length} different symbols: task.digits must be >= {length}")
        if separator.strip():
            raise ValueError("task.separator must be whitespace or empty")
        self.length, self.digits, self.sep, self.distinct = length, digits, separator, distinct
        self.symbols = ALPHABET[:digits]
        self.name = f"sort{length}"

    def prompts(self, n: int, seed: int) -> list[Prompt]:
        rng = random.Random(f"{self.name}:{seed}")
        out = []
        for i in range(n):
            if self.distinct:
                xs = rng.sample(self.symbols, self.length)
            else:
                xs = [rng.choice(self.symbols) for _ in range(self.length)]
            out.append(Prompt(f"sort: {self.sep.join(xs)} =", meta={"digits": xs}, source=f"{self.name}:{seed}:{i}"))
        return out

    def _symbols_in(self, text: str) -> list[str]:
        return [c for c in text if c in self.symbols]

    def _digits(self, prompt: Prompt) -> list[str]:
        if "digits" in prompt.meta:
            return [str(d) for d in prompt.meta["digits"]]
        head = prompt.text.split("=")[0]
        return self._symbols_in(head.removeprefix("sort:"))

    def expert_continuation(self, prompt: Prompt, prefix: str) -> str:
        xs = self._digits(prompt)
        if not xs:
            raise ExpertError(f"task {self.name}: prompt {prompt.text!r} has no symbols to sort")
        emitted = self._symbols_in(prefix)
        if self.recovery == "positional":
            rest = sorted(xs)[len(emitted):]
        else:
            remaining = Counter(xs)
            for d in emitted:
                if remaining[d] > 0:
                    remaining[d] -= 1
            rest = sorted(remaining.elements())
        if not rest:
            return ""
        text = self.sep.join(rest)
        return text if not self.sep or prefix.endswith(self.sep) else self.sep + text

    def gold(self, prompt: Prompt, completion: str) -> float:
        return float(self._symbols_in(completion) == sorted(self._digits(prompt)))
