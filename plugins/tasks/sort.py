"""Sort or reverse T symbols: the horizon T is a knob. The expert knows the best next symbol from any prefix."""

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
    verb = "sort"

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
        self.name = f"{self.verb}{length}"

    def prompts(self, n: int, seed: int) -> list[Prompt]:
        rng = random.Random(f"{self.name}:{seed}")
        out = []
        for i in range(n):
            if self.distinct:
                xs = rng.sample(self.symbols, self.length)
            else:
                xs = [rng.choice(self.symbols) for _ in range(self.length)]
            out.append(Prompt(f"{self.verb}: {self.sep.join(xs)} =", meta={"digits": xs}, source=f"{self.name}:{seed}:{i}"))
        return out

    def _symbols_in(self, text: str) -> list[str]:
        return [c for c in text if c in self.symbols]

    def _digits(self, prompt: Prompt) -> list[str]:
        if "digits" in prompt.meta:
            return [str(d) for d in prompt.meta["digits"]]
        head = prompt.text.split("=")[0]
        return self._symbols_in(head.removeprefix(f"{self.verb}:"))

    def expert_continuation(self, prompt: Prompt, prefix: str) -> str:
        xs = self._digits(prompt)
        if not xs:
            raise ExpertError(f"task {self.name}: prompt {prompt.text!r} has no symbols to sort")
        emitted = self._symbols_in(prefix)
        target = self.target(xs)
        if self.recovery == "positional":
            rest = target[len(emitted):]
        else:
            used = Counter(emitted)
            rest = []
            for d in target:
                if used[d] > 0:
                    used[d] -= 1
                else:
                    rest.append(d)
        if not rest:
            return ""
        text = self.sep.join(rest)
        return text if not self.sep or prefix.endswith(self.sep) else self.sep + text

    def gold(self, prompt: Prompt, completion: str) -> float:
        return float(self._symbols_in(completion) == self.target(self._digits(prompt)))

    def target(self, xs: list[str]) -> list[str]:
        """The answer: the input symbols in the task's order."""
        return sorted(xs)


class ReverseSymbols(SortDigits):
    """Prompt "reverse: 3 1 2 =", response " 2 1 3": the input read backwards, with the same knobs and experts.

    A learner can solve it by position (output t is input T - 1 - t) or by pointer (find the last symbol emitted in
    the input, emit its left neighbour). Both are exact on demonstrations with distinct symbols; with repeats, the
    pointer is ambiguous and, once it jumps to the wrong occurrence, every following symbol is off by the jump under
    the positional expert: the compounding that DAgger's labels of the learner's own states are meant to repair.
    """

    verb = "reverse"

    def target(self, xs: list[str]) -> list[str]:
        return list(reversed(xs))
