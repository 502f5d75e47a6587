"""Plugin contracts. Every swappable part implements one of these small ABCs and is picked by Hydra `_target_`.

A user's plugin is any importable class that subclasses the matching contract; no edit to framework/ or plugins/
is needed (`rlhf dataset._target_=my_pkg.MyCorpus`, or a config group added with `hydra.searchpath`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from framework.records import Demonstration, Prompt, Ranking, Text

if TYPE_CHECKING:  # heavy imports stay out of `rlhf --help`
    import random

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
    # the gold of an exactly right completion (`eval/exact_match` counts completions at or above it); None for a
    # gold without such a level (a learned gold scores any real number)
    exact_score: float | None = 1.0

    @abstractmethod
    def prompts(self, n: int, seed: int) -> list[Prompt]:
        """`n` prompts drawn with `seed` (different seeds give the train and held-out sets)."""

    @abstractmethod
    def gold(self, prompt: Prompt, completion: str) -> float:
        """The true score of `completion` (1.0 = exactly right; tasks may give partial credit in [0, 1]; a learned
        gold, such as a reward model's, may be any real number)."""

    def golds(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        """`gold` of many (prompt, completion) pairs; override when scoring a batch is cheaper (a reward-model gold)."""
        return [float(self.gold(p, c)) for p, c in zip(prompts, completions)]

    @abstractmethod
    def expert_continuation(self, prompt: Prompt, prefix: str) -> str:
        """The rest of the best response after `prefix` ("" = stop now). Raise ExpertError if there is none."""

    def demonstration(self, prompt: Prompt) -> Demonstration:
        """The expert's whole response, as a demonstration."""
        return Demonstration(prompt=prompt.text, response=self.expert_continuation(prompt, ""), source=prompt.source)

    def environment(self, prompt: Prompt, prefix: str) -> str:
        """Text the task's environment appends after the response `prefix` before the learner acts again (e.g. an
        observation of the state its last action led to; the rest of it, when `prefix` ends inside one), or ""
        when it is the learner's turn. Imitation rollouts and task evaluation force this text into the response,
        so a learner cannot write its own observations. The default task has no environment."""
        return ""

    @property
    def has_environment(self) -> bool:
        return type(self).environment is not Task.environment


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

    kind "lm": outputs is a `CausalLMOutput` with `logits: [batch, seq, vocab]`; batch has `input_ids` and
    `labels: [batch, seq]` with -100 for ignored positions (pretraining, SFT).
    kind "preference": outputs is a tensor of rewards `[groups, K]` in preference order (column 0 = the best
    response of its group); batch has `rank_mask: [groups, K]` (False where a group has fewer than K responses) and,
    when the data gave one, `margin: [groups]` (pairwise rows; NaN where absent) (reward modelling).
    metrics: extra detached scalars the stage logs under `train/` (validation logs the stage's own `val/` metrics).
    """

    kind: str = "lm"

    @abstractmethod
    def __call__(self, outputs: Any, batch: Mapping[str, "torch.Tensor"]) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        ...


class RewardFunction(ABC):
    """A programmatic reward: a task's gold scorer, a sentiment lexicon, ... Used as the hidden truth that
    synthetic labellers compare by and that experiments judge learned rewards (and policies) against."""

    name: str = "reward"

    @abstractmethod
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        """One score per (prompt, completion); higher is better."""


class Labeller(ABC):
    """Turns K responses to one prompt into a preference ranking (a synthetic human, or a lookup of real labels)."""

    @abstractmethod
    def label(self, prompt: Prompt, responses: Sequence[str], rng: "random.Random") -> Ranking:
        """Rank `responses` (best first); record the gold scores in the Ranking when there are any."""

    def label_many(self, prompts: Sequence[Prompt], groups: Sequence[Sequence[str]],
                   rng: "random.Random") -> list[Ranking]:
        """`label` of each (prompt, responses) pair, in order; override when scoring them together is cheaper (a
        reward-model gold scores a batch in one forward). The rankings must be those of calling `label` in turn."""
        return [self.label(p, g, rng) for p, g in zip(prompts, groups)]


@dataclass
class ComparisonContext:
    """What a comparison dataset that makes its comparisons here may use (file datasets ignore it).

    sample(prompts, k, max_new_tokens, temperature): k completions per prompt sampled from the stage's policy (the
    SFT model) with top_k=0, top_p=1; cached by the stage, keyed by the policy's weights and the arguments.
    """

    sample: Callable[[Sequence[Prompt], int, int, float], list[list[str]]]
    task: Task | None = None
    labeller: Labeller | None = None
    seed: int = 0


class ComparisonDataset(ABC):
    """Preference data for reward modelling: pairwise comparisons and K-wise rankings, as `Ranking` records.

    needs_policy: True when the dataset samples responses from the policy being judged (and asks a labeller).
    """

    needs_policy: bool = False

    @abstractmethod
    def comparisons(self, ctx: ComparisonContext) -> Iterator[Ranking]:
        """Yield every comparison, validated, in a deterministic order."""

    def validation(self, ctx: ComparisonContext) -> Iterator[Ranking] | None:
        """A held-out set of its own (e.g. fixed across a sweep over the number of labels); None: the stage holds
        out `stage.val_fraction` of `comparisons()` by a seeded hash."""
        return None

    def describe(self) -> str:
        return type(self).__name__


class RewardHead(ABC):
    """Builds the module that turns the trunk's hidden states into rewards.

    The module is called as `head(hidden: [batch, seq, d], attention_mask: [batch, seq]) -> [batch, members]`
    (members = 1 except for ensembles; the reward of a sequence is the mean over members).
    sequence_classification: True when the head is exactly a bias-free linear map of the last non-pad token, so
    the reward model exports as a Hugging Face `...ForSequenceClassification` (num_labels=1) directory.
    """

    members: int = 1
    sequence_classification: bool = False

    @abstractmethod
    def build(self, hidden_size: int) -> "torch.nn.Module":
        ...


@dataclass
class Rollout:
    """One iteration's samples, as the RL stage hands them to a policy algorithm. Tensors are [B, ...] with
    B = prompts x generations_per_prompt (the copies of a prompt are adjacent); response tensors are [B, T].

    query_ids/query_mask: left-padded prompts; response_mask: 1 up to and including the stop token.
    logprobs/ref_logprobs: per-token log-probs of the sampled tokens under the policy at sampling time and under the
    frozen reference, both at the sampling temperature; values: the critic's values (algorithms with a critic).
    scores: the reward source's scores after the no-EOS penalty and clipping (raw_scores: before).
    """

    prompts: list
    texts: list[str]
    query_ids: "torch.Tensor"
    query_mask: "torch.Tensor"
    response_ids: "torch.Tensor"
    response_mask: "torch.Tensor"
    logprobs: "torch.Tensor"
    ref_logprobs: "torch.Tensor"
    values: "torch.Tensor | None"
    scores: "torch.Tensor"
    raw_scores: "torch.Tensor"
    ended: "torch.Tensor"
    group_size: int = 1
    stats: dict = field(default_factory=dict)


class PolicyAlgorithm(ABC):
    """An on-policy RL algorithm for LMs: experience from a rollout, then a loss per minibatch.

    generations_per_prompt: samples per prompt (group methods: GRPO, RLOO); needs_value: a value estimate per token;
    critic: where it comes from, "shared" (a value head on the policy's trunk) or "separate" (its own transformer,
    initialised from the reward model at critic_path, or the learned reward's path when that is None);
    value_layers: with a shared critic, 0 puts the value layer on the policy's last hidden state, N > 0 on a branch
    of its own N layers, copied from the policy's top N (trlX's `num_value_layers_unfrozen`); critic_layers: with a
    separate critic, None keeps the reward model's whole transformer, N its bottom N layers;
    epochs x minibatches: the updates per rollout (each minibatch one optimizer step).
    """

    generations_per_prompt: int = 1
    needs_value: bool = False
    critic: str = "shared"
    critic_path: str | None = None
    value_layers: int = 0
    critic_layers: int | None = None
    epochs: int = 1
    minibatches: int = 1

    @abstractmethod
    def make_experience(self, rollout: Rollout, kl_coef: float, kl_estimator: str) -> dict[str, "torch.Tensor"]:
        """Tensors for the updates: per-sample ones are [B, ...] and are split into minibatches; must include
        `seq_kl` [B] (KL to the reference summed over tokens, for the KL controller and the logs). Entries named
        `returns/...` or `advantages/...` holding scalars are logged."""

    @abstractmethod
    def loss(self, logprobs: "torch.Tensor", values: "torch.Tensor | None",
             minibatch: Mapping[str, "torch.Tensor"]) -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
        """The loss of a minibatch from the policy's current log-probs [b, T] (and values); metrics are logged
        averaged over the iteration's minibatches (names like `loss/policy`, `policy/clipfrac`)."""

    def needs_reference(self, kl_coef: float, adaptive: bool) -> bool:
        """Whether the frozen reference's log-probs are used (else the stage skips its forward): by default, when
        the KL penalty can be non-zero."""
        return adaptive or kl_coef != 0.0

    def state_dict(self) -> dict:
        """State that must survive a checkpoint (e.g. a running baseline)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PreferenceAlgorithm(ABC):
    """An offline policy algorithm (DPO, IPO, ...): trains the policy directly on comparisons, from the summed
    log-probs of the chosen and rejected responses under the policy and the frozen reference ([pairs] each).

    average_logprobs: log-probs averaged over response tokens instead of summed (IPO)."""

    average_logprobs: bool = False

    @abstractmethod
    def loss(self, policy_chosen: "torch.Tensor", policy_rejected: "torch.Tensor", ref_chosen: "torch.Tensor",
             ref_rejected: "torch.Tensor") -> tuple["torch.Tensor", dict[str, "torch.Tensor"]]:
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
    Under data parallelism every process calls round_dataset and must get the same dataset: work worth splitting
    (DAgger's rollouts) goes through framework/distributed.py's `my_share` and `gathered`.
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
