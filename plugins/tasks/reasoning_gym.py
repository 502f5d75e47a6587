"""A thin adapter over the `reasoning-gym` package (Apache-2.0): any of its generators, scored by its own checker.

Expert: the dataset's reference answer, written character by character; from a wrong prefix it continues with the
answer's characters at the following positions (the fewest further character errors), then stops.
"""

from __future__ import annotations

from typing import Any

from framework.errors import ConfigError, ExpertError
from framework.interfaces import Task
from framework.records import Prompt


class ReasoningGymTask(Task):
    def __init__(self, dataset: str = "basic_arithmetic", config: dict | None = None, instruction: str = ""):
        try:
            import reasoning_gym  # noqa: F401
        except ImportError:
            raise ConfigError("task=reasoning_gym needs the package: pip install 'rlhf-lab[tasks]'") from None
        self.dataset, self.config, self.instruction = dataset, dict(config or {}), instruction
        self.name = f"rg_{dataset}"
        self._checkers: dict[int, Any] = {}

    def _generator(self, size: int, seed: int):
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.config)
        except Exception as err:  # unknown name or config key: reasoning-gym raises several types
            raise ConfigError(f"task.dataset={self.dataset!r} with config {self.config}: {err}") from err

    def prompts(self, n: int, seed: int) -> list[Prompt]:
        ds = self._generator(n, seed)
        self._checkers[seed] = ds
        out = []
        for i in range(n):
            entry = ds[i]
            out.append(Prompt(self.instruction + entry["question"],
                              meta={"answer": str(entry["answer"]), "entry": entry, "seed": seed},
                              source=f"{self.name}:{seed}:{i}"))
        return out

    def expert_continuation(self, prompt: Prompt, prefix: str) -> str:
        if "answer" not in prompt.meta:
            raise ExpertError(f"task {self.name}: prompt {prompt.text[:60]!r} carries no reference answer")
        answer = " " + prompt.meta["answer"]
        return answer[len(prefix):] if len(prefix) < len(answer) else ""

    def gold(self, prompt: Prompt, completion: str) -> float:
        seed = prompt.meta.get("seed")
        checker = self._checkers.get(seed) or self._generator(1, seed or 0)
        return float(checker.score_answer(completion.strip(), prompt.meta["entry"]))
