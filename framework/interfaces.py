"""Plugin contracts. Every swappable part implements one of these small ABCs and is picked by Hydra `_target_`.

A user's plugin is any importable class that subclasses the matching contract; no edit to framework/ or plugins/
is needed (`rlhf dataset._target_=my_pkg.MyCorpus`, or a config group added with `hydra.searchpath`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from framework.records import Demonstration, Prompt, Text

if TYPE_CHECKING:  # heavy imports stay out of `rlhf --help`
    import torch
    from omegaconf import DictConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from framework.tracking import TrackedRun


class TextDataset(ABC):
    """A corpus of raw-text documents (pretraining).

    Implementations validate their input while reading and raise `framework.errors.DataError` naming the file and
    1-based line of the first bad row (or skip bad rows when the user asked for it, reporting how many).
    """

    @abstractmethod
    def texts(self) -> Iterator[Text]:
        """Yield every document, in a deterministic order."""

    def describe(self) -> str:
        """One line for logs: what is read and from where."""
        return type(self).__name__


class DemonstrationDataset(ABC):
    """Demonstrations for supervised fine-tuning: prompt/response pairs or whole conversations."""

    @abstractmethod
    def demonstrations(self) -> Iterator[Demonstration]:
        """Yield every demonstration, validated, in a deterministic order."""

    def describe(self) -> str:
        return type(self).__name__


class Task(ABC):
    """A prompt source with ground truth: a programmatic gold scorer and an expert that acts well from any state.

    Responses are text. The expert works on text too: from a prompt and any response prefix (also one the expert
    would never have produced), `expert_continuation` returns the rest of the best response from there.
    """

    name: str = "task"

    @abstractmethod
    def prompts(self, n: int, seed: int) -> list[Prompt]:
        """`n` prompts drawn with `seed` (different seeds give the train and held-out sets)."""

    @abstractmethod
    def gold(self, prompt: Prompt, completion: str) -> float:
        """The true score of `completion` (1.0 = exactly right; tasks may give partial credit in [0, 1])."""

    @abstractmethod
    def expert_continuation(self, prompt: Prompt, prefix: str) -> str:
        """The rest of the best response after `prefix` ("" = stop now). Raise ExpertError if there is none."""

    def demonstration(self, prompt: Prompt) -> Demonstration:
        """The expert's whole response, as a demonstration."""
        return Demonstration(prompt=prompt.text, response=self.expert_continuation(prompt, ""), source=prompt.source)


class Expert(ABC):
    """Labels states for imitation learning: the best next token from (prompt, response prefix) token ids."""

    def setup(self, tokenizer: "PreTrainedTokenizerBase", stop_id: int, task: Task | None = None) -> None:
        """Called once by the stage with the learner's tokenizer, its stop token and the configured task."""
        self.tokenizer, self.stop_id, self.task = tokenizer, stop_id, task

    @abstractmethod
    def next_token(self, prompt: Prompt, prompt_ids: Sequence[int], prefix_ids: Sequence[int]) -> int:
        """The expert's next token in state (prompt, prefix)."""

    def next_token_labels(self, prompt: Prompt, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[int]:
        """Labels for every state along a trajectory: entry t is the expert's next token after response_ids[:t].

        Returns len(response_ids) + 1 labels. Override when one call can label all states (e.g. a teacher LM).
        """
        return [self.next_token(prompt, prompt_ids, response_ids[:t]) for t in range(len(response_ids) + 1)]


class TokenizerSource(ABC):
    """Produces the tokenizer a stage uses: trained here on the corpus, or loaded from a path.

    trains: True for sources that make a new vocabulary. A stage that continues from `model.path` then uses the
    model's own tokenizer instead, since a model's embeddings belong to the vocabulary it was trained with.
    """

    trains: bool = False

    @abstractmethod
    def build(self, corpus: Sequence[str], cache_dir: Path) -> "PreTrainedTokenizerBase":
        """Return a tokenizer with distinct PAD and EOS tokens and a chat template.

        corpus: the training documents (a trainer uses them; a loader may ignore them).
        cache_dir: a folder the source may use to cache what it trains.
        """


class ModelSource(ABC):
    """Produces the causal LM a stage trains: built from a config, or loaded from a local directory."""

    path: str | None

    @abstractmethod
    def build(self, tokenizer: "PreTrainedTokenizerBase") -> "PreTrainedModel":
        """Return a `transformers` causal LM whose vocabulary covers `tokenizer`."""


class Loss(ABC):
    """`(model outputs, batch) -> (scalar loss, metrics)`.

    outputs: what the stage's model returned (for LMs a `CausalLMOutput` with `logits: [batch, seq, vocab]`).
    batch: the collated batch (for LMs `input_ids`, `labels: [batch, seq]` with -100 for ignored positions).
    metrics: extra detached scalars the stage logs under `train/` and `val/`.
    """

    @abstractmethod
    def __call__(self, outputs: Any, batch: Mapping[str, "torch.Tensor"]) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        ...


@dataclass
class StageContext:
    """What the runner hands a stage: the whole resolved config, where to write, and the tracking run."""

    cfg: "DictConfig"
    output_dir: Path
    run: "TrackedRun"
    ckpt_path: str | None = None


@dataclass
class StageResult:
    """What a stage hands back: the exported artifact directory and its headline metrics."""

    artifact_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)


IGNORE_INDEX = -100  # label of a position that takes no loss (prompt tokens, padding)


@dataclass
class Example:
    """One tokenised training sequence: `labels` is -100 where no loss is taken (prompt tokens, padding)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class ImitationContext:
    """What an imitation algorithm may use to build a round's dataset."""

    demonstrations: list[Example]          # the demonstrations, tokenised (expert-labelled trajectories)
    prompts: list[Prompt]                  # prompts to roll out on (from the task), empty without a task
    encode_prompt: Any                     # Prompt -> list[int], the prompt as the learner sees it
    model: Any                             # the learner (transformers causal LM), current weights
    tokenizer: Any
    stop_id: int
    max_new_tokens: int
    expert: Expert | None
    seed: int


class ImitationAlgorithm(ABC):
    """Decides the training set of each round of supervised imitation (behaviour cloning, DAgger, ...).

    The SFT stage trains `trainer.max_steps / num_rounds` steps per round on `round_dataset(r, ctx)`, with the
    learner's current weights in ctx.model. State that must survive a checkpoint goes in state_dict().
    """

    num_rounds: int = 1
    requires_expert: bool = False  # True: the stage refuses to start without a task and an expert

    @abstractmethod
    def round_dataset(self, round_idx: int, ctx: ImitationContext) -> list[Example]:
        ...

    def round_metrics(self) -> dict[str, float]:
        """Bookkeeping of the last round (dataset size, expert labels, ...), logged under `imitation/`."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Stage(ABC):
    """One step of the recipe (pretrain, sft, reward_model, rl, eval): reads inputs, trains, exports a HF dir."""

    name: str

    @abstractmethod
    def run(self, ctx: StageContext) -> StageResult:
        ...
