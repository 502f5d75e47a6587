"""DAgger (Ross, Gordon & Bagnell 2011): roll out the mixture beta_i * expert + (1 - beta_i) * learner, let the
expert label every state the rollouts visit, aggregate, retrain on the aggregate.

Round 0 is the expert's own round (beta_0 = 1): a share of the demonstrations. Round i >= 1 rolls out with
beta_i = p^i (p = 0: the learner alone after round 0, the "beta_1 = 1 then 0" schedule).
"""

from __future__ import annotations

import random

from framework.distributed import failing_together, gathered, my_share, rank, world_size
from framework.errors import ConfigError
from framework.imitation import count_labels, label_trajectory, rollout
from framework.interfaces import Example, ImitationAlgorithm, ImitationContext


class DAgger(ImitationAlgorithm):
    requires_expert = True

    def __init__(self, rounds: int = 4, first_round_demos: float = 0.5, rollouts_per_round: int = 200,
                 beta_p: float = 0.5, rollout_batch_size: int = 64, betas: list[float] | None = None):
        if rounds < 2:
            raise ConfigError("imitation.rounds must be >= 2 for DAgger (round 0 is the demonstrations)")
        if rollouts_per_round < 1 or rollout_batch_size < 1:
            raise ConfigError(f"imitation.rollouts_per_round ({rollouts_per_round}) and imitation.rollout_batch_size "
                              f"({rollout_batch_size}) must be >= 1 (dagger_mix takes dataset.n / 6: n >= 6)")
        if not 0.0 < first_round_demos <= 1.0 or not 0.0 <= beta_p <= 1.0:
            raise ConfigError("imitation.first_round_demos must be in (0, 1] and imitation.beta_p in [0, 1]")
        self.num_rounds = rounds
        self.first_round_demos, self.rollouts_per_round = first_round_demos, rollouts_per_round
        self.beta_p, self.rollout_batch_size = beta_p, rollout_batch_size
        if betas is not None and (len(betas) != rounds - 1 or not all(0.0 <= b <= 1.0 for b in betas)):
            raise ConfigError(f"imitation.betas needs {rounds - 1} values in [0, 1], one per rollout round")
        self.betas = list(betas) if betas is not None else None
        self.aggregate: list[Example] = []
        self.rounds_done = 0
        self._metrics: dict[str, float] = {}

    def beta(self, round_idx: int) -> float:
        """beta_i: the explicit schedule `betas[i - 1]` when given, else beta_p ** i."""
        return self.betas[round_idx - 1] if self.betas is not None else self.beta_p**round_idx

    def round_dataset(self, round_idx: int, ctx: ImitationContext) -> list[Example]:
        if round_idx < self.rounds_done:  # restored from a checkpoint: the aggregate already holds this round
            self._metrics = {"round": round_idx, "dataset_size": len(self.aggregate),
                             "expert_labels": count_labels(self.aggregate)}
            return list(self.aggregate)
        if round_idx == 0:
            n = max(1, round(self.first_round_demos * len(ctx.demonstrations)))
            new = list(ctx.demonstrations[:n])
            beta = 1.0
        else:
            if ctx.expert is None or not ctx.prompts:
                raise ConfigError("imitation=dagger needs a task to roll out on and an expert to label states: "
                                  "add task=<sort|addition|reasoning_gym> expert=task (or expert=teacher_lm)")
            rng = random.Random(ctx.seed * 1009 + round_idx)
            prompts = [rng.choice(ctx.prompts) for _ in range(self.rollouts_per_round)]
            beta = self.beta(round_idx)
            # under DDP each process rolls out its share of the round's prompts (with its own draws for the
            # expert/learner mixture) and every process gets the whole round back, in the prompts' order
            share = my_share(len(prompts))
            if world_size() > 1:
                rng = random.Random((ctx.seed * 1009 + round_idx) * 7919 + rank() + 1)
            prompts = [prompts[i] for i in share]
            with failing_together(f"in DAgger round {round_idx}'s rollouts"):
                prompt_ids = [ctx.encode_prompt(p) for p in prompts]
                responses = rollout(ctx.model, ctx.tokenizer, prompt_ids, ctx.max_new_tokens, ctx.stop_id,
                                    expert=ctx.expert, prompts=prompts, beta=beta, rng=rng,
                                    batch_size=self.rollout_batch_size)
                labelled = [label_trajectory(ctx.expert, p, ids, resp, ctx.stop_id)
                            for p, ids, resp in zip(prompts, prompt_ids, responses)]
            new = gathered(labelled)
        self.aggregate.extend(new)
        self.rounds_done = round_idx + 1
        self._metrics = {"round": round_idx, "beta": beta, "new_examples": len(new), "new_labels": count_labels(new),
                         "dataset_size": len(self.aggregate), "expert_labels": count_labels(self.aggregate)}
        return list(self.aggregate)

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {"aggregate": [(ex.input_ids, ex.labels) for ex in self.aggregate], "rounds_done": self.rounds_done}

    def load_state_dict(self, state: dict) -> None:
        self.aggregate = [Example(list(i), list(l)) for i, l in state.get("aggregate", [])]
        self.rounds_done = int(state.get("rounds_done", 0))
