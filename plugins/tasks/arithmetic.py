"""Multi-digit addition. The expert writes the answer digit by digit, and from a wrong prefix still writes the
digits the answer has at the following positions (the fewest further digit errors); it stops at the answer's length."""

from __future__ import annotations

import random
import re

from framework.errors import ExpertError
from framework.interfaces import Task
from framework.records import Prompt

NUMBER = re.compile(r"^(\d+)\+(\d+)=$")


class Addition(Task):
    """Prompt "4821+377=", response "5198". Gold: 1.0 for the exact answer, else 0.0."""

    def __init__(self, digits: int = 3):
        if digits < 1:
            raise ValueError("task.digits must be >= 1")
        self.digits = digits
        self.name = f"addition{digits}"

    def prompts(self, n: int, seed: int) -> list[Prompt]:
        rng = random.Random(f"{self.name}:{seed}")
        hi = 10**self.digits
        out = []
        for i in range(n):
            a, b = rng.randrange(hi), rng.randrange(hi)
            out.append(Prompt(f"{a}+{b}=", meta={"answer": str(a + b)}, source=f"{self.name}:{seed}:{i}"))
        return out

    def answer(self, prompt: Prompt) -> str:
        if "answer" in prompt.meta:
            return str(prompt.meta["answer"])
        m = NUMBER.match(prompt.text.strip())
        if not m:
            raise ExpertError(f"task {self.name}: cannot read an addition from prompt {prompt.text!r}")
        return str(int(m.group(1)) + int(m.group(2)))

    def expert_continuation(self, prompt: Prompt, prefix: str) -> str:
        answer = self.answer(prompt)
        written = len(re.sub(r"\D", "", prefix))
        return answer[written:]

    def gold(self, prompt: Prompt, completion: str) -> float:
        return float(completion.strip() == self.answer(prompt))
