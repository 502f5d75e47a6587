"""A teacher language model from a local directory: its argmax next token from any prefix (one forward labels all)."""

from __future__ import annotations

from typing import Sequence

import torch

from framework.errors import ExpertError
from framework.interfaces import Expert
from framework.models import load_causal_lm
from framework.records import Prompt
from framework.tokenization import load_tokenizer


class TeacherLM(Expert):
    def __init__(self, path: str):
        self.path = path
        self.model = None

    def setup(self, tokenizer, stop_id, task=None) -> None:
        super().setup(tokenizer, stop_id, task)
        teacher_tok = load_tokenizer(self.path)
        if teacher_tok.get_vocab() != tokenizer.get_vocab():
            raise ExpertError(f"teacher {self.path!r} uses a different tokenizer from the learner; token-level labels "
                              "need the same vocabulary (train the learner with tokenizer=pretrained tokenizer.path=<teacher>)")
        self.model = load_causal_lm(self.path).eval()

    @torch.no_grad()
    def next_token_labels(self, prompt: Prompt, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[int]:
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=next(self.model.parameters()).device)
        if ids.size(1) == 0:
            raise ExpertError(f"teacher {self.path!r}: cannot label an empty state (prompt {prompt.text!r})")
        logits = self.model(input_ids=ids).logits[0]
        start = len(prompt_ids) - 1
        return logits[start:].argmax(-1).tolist()  # position p predicts token p+1: len(response_ids)+1 labels

    def next_token(self, prompt: Prompt, prompt_ids: Sequence[int], prefix_ids: Sequence[int]) -> int:
        return self.next_token_labels(prompt, prompt_ids, prefix_ids)[-1]
