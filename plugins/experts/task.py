"""The configured task's programmatic expert, at token level: decode the prefix, ask the task, tokenise the answer."""

from __future__ import annotations

from typing import Sequence

from framework.errors import ExpertError
from framework.interfaces import Expert
from framework.records import Prompt


class TaskExpert(Expert):
    def setup(self, tokenizer, stop_id, task=None) -> None:
        if task is None:
            raise ExpertError("expert=task needs a task: add task=<sort|addition|reasoning_gym>")
        super().setup(tokenizer, stop_id, task)

    def next_token(self, prompt: Prompt, prompt_ids: Sequence[int], prefix_ids: Sequence[int]) -> int:
        prefix = self.tokenizer.decode(list(prefix_ids), skip_special_tokens=True)
        try:
            rest = self.task.expert_continuation(prompt, prefix)
        except ExpertError as err:
            raise ExpertError(f"{err} [state: prompt {prompt.text!r}, response prefix {prefix!r}]") from None
        if not rest:
            return self.stop_id
        ids = self.tokenizer(rest, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ExpertError(f"task {self.task.name}: expert continuation {rest!r} of prefix {prefix!r} "
                              f"(prompt {prompt.text!r}) tokenises to nothing")
        return ids[0]
