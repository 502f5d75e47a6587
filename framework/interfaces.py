"""Plugin contracts. Every swappable part implements one of these small ABCs and is picked by Hydra `_target_`.

A user's plugin is any importable class that subclasses the matching contract; no edit to framework/ or plugins/
is needed (`rlhf dataset._target_=my_pkg.MyCorpus`, or a config group added with `hydra.searchpath`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from framework.records import Text

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


class Stage(ABC):
    """One step of the recipe (pretrain, sft, reward_model, rl, eval): reads inputs, trains, exports a HF dir."""

    name: str

    @abstractmethod
    def run(self, ctx: StageContext) -> StageResult:
        ...
