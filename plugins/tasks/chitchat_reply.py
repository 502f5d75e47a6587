"""Reply to a chitchat conversation in a friendly way: prompts are real conversation openings, the gold is the
sentiment of the reply (plugins.rewards.sentiment). It serves reward learning and RL; for DAgger on chat its expert is
the reference policy: the corpus's own next turn, continued at the same character position from any prefix (the
classic reference policy of imitation learning for sequences, Hamming-optimal against that one reply). It knows
one right reply, not every friendly one."""

from __future__ import annotations

import random

from framework.errors import ExpertError
from framework.interfaces import Task
from framework.records import Prompt
from plugins.datasets.chitchat import conversation_turns, load_conversations
from plugins.rewards.sentiment import friendliness


class FriendlyReply(Task):
    """prompts(n, seed): the first `context_turns` turns (joined by newlines, the last `max_prompt_chars`
    characters) of `n` conversations drawn with `seed` from the 7,168 of the chitchat-dataset package."""

    name = "friendly_reply"

    def __init__(self, context_turns: int = 1, max_prompt_chars: int = 200, repetition_penalty: bool = True):
        if context_turns < 1:
            raise ValueError("task.context_turns must be >= 1")
        self.context_turns, self.max_prompt_chars = context_turns, max_prompt_chars
        self.repetition_penalty = repetition_penalty
        self._pool: list[tuple[str, str]] | None = None

    def pool(self) -> list[tuple[str, str, str]]:
        """(conversation id, prompt text, the conversation's next turn) for every conversation long enough."""
        if self._pool is None:
            self._pool = []
            for conv_id, conv in load_conversations().items():
                turns = conversation_turns(conv)
                if len(turns) > self.context_turns:
                    text = "\n".join(turns[: self.context_turns])[-self.max_prompt_chars :]
                    self._pool.append((conv_id, text, turns[self.context_turns]))
        return self._pool

    def prompts(self, n: int, seed: int) -> list[Prompt]:
        """A seeded shuffle of the pool (reshuffled when n exceeds it): prompts(n) is a prefix of prompts(m > n)."""
        pool = self.pool()
        rng = random.Random(f"{self.name}:{seed}")
        picks: list[tuple[str, str, str]] = []
        while len(picks) < n:
            order = list(range(len(pool)))
            rng.shuffle(order)
            picks.extend(pool[i] for i in order[: n - len(picks)])
        return [Prompt(text, meta={"reference": reply}, source=f"chitchat:{conv_id}") for conv_id, text, reply in picks]

    def gold(self, prompt: Prompt, completion: str) -> float:
        return friendliness(completion, self.repetition_penalty)

    def expert_continuation(self, prompt: Prompt, prefix: str) -> str:
        """The reference reply from the prefix's length on ("" once the prefix is as long: stop)."""
        reference = prompt.meta.get("reference")
        if reference is None:
            raise ExpertError(f"task {self.name}: prompt {prompt.text[:60]!r} carries no reference reply (prompts from "
                              "task.prompts() do); for other prompts use a teacher LM (expert=teacher_lm)")
        return reference[len(prefix.lstrip()) :]
