"""Imitation-learning plumbing shared by the SFT stage and imitation plugins: encoding demonstrations with the
response-only loss mask, rolling out the learner (optionally mixed with an expert), labelling visited states, and
scoring a task with greedy decoding. Pure helpers: no Lightning."""

from __future__ import annotations

import random
import warnings
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from framework.errors import ConfigError, DataError, ExpertError
from framework.interfaces import IGNORE_INDEX, Example, Expert, Task
from framework.records import Demonstration, Prompt
from framework.rollout import HFGenerator, SamplingSettings
from framework.tokenization import TURN_END

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMATS = ("chat", "plain")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"stage.format={fmt!r}; expected one of {FORMATS}")


def stop_token_id(tokenizer: "PreTrainedTokenizerBase", fmt: str) -> int:
    """The token that ends a response: the chat turn end in chat format (when the vocabulary has it), else EOS."""
    if fmt == "chat" and TURN_END in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(TURN_END)
    return tokenizer.eos_token_id


# the callers cut what is too long themselves (and count it): transformers' "longer than the specified maximum
# sequence length ... indexing errors" notice, printed on every run with long prompts, would be a false alarm
_NO_LENGTH_NOTICE = {"verbose": False}


def encode_prompt(tokenizer: "PreTrainedTokenizerBase", text: str, fmt: str) -> list[int]:
    """The prompt as the learner sees it before its response."""
    if fmt == "chat":
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                  add_generation_prompt=True, return_dict=True,
                                                  tokenizer_kwargs=_NO_LENGTH_NOTICE)["input_ids"])
    return tokenizer(text, add_special_tokens=False, **_NO_LENGTH_NOTICE)["input_ids"]


class PromptEncoder:
    """prompt text -> token ids as the policy sees them (`encode_prompt`), cut from the left so that prompt +
    `max_new_tokens` fit the model's `context`; counts the prompts it cut (`truncated`)."""

    def __init__(self, tokenizer, fmt: str, context: int | None, max_new_tokens: int):
        if context is not None and context - max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
                              f"of {context} tokens")
        self.tokenizer, self.fmt = tokenizer, fmt
        self.room = None if context is None else context - max_new_tokens
        self.truncated = 0

    def __call__(self, text: str) -> list[int]:
        ids = encode_prompt(self.tokenizer, text, self.fmt)
        if self.room is not None and len(ids) > self.room:
            self.truncated += 1
            ids = ids[-self.room :]
        return ids


def _encode_full(tokenizer, demo: Demonstration, fmt: str) -> tuple[list[int], list[int]]:
    if fmt == "plain":
        if demo.messages is not None:
            raise DataError("a conversation cannot be encoded with stage.format=plain; use stage.format=chat",
                            demo.source or None)
        prompt = tokenizer(demo.prompt, add_special_tokens=False, **_NO_LENGTH_NOTICE)["input_ids"]
        response = tokenizer(demo.response, add_special_tokens=False, **_NO_LENGTH_NOTICE)["input_ids"]
        response = response + [tokenizer.eos_token_id]
        return prompt + response, [IGNORE_INDEX] * len(prompt) + response
    enc = tokenizer.apply_chat_template(demo.as_messages(), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True, tokenizer_kwargs=_NO_LENGTH_NOTICE)
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    if not any(mask):
        raise DataError("the tokenizer's chat template marks no assistant tokens (it needs {% generation %} blocks); "
                        "use a tokenizer trained here, or stage.format=plain", demo.source or None)
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def encode_demonstration(tokenizer, demo: Demonstration, fmt: str, max_length: int,
                         cut_response: bool = False) -> tuple[Example | None, str]:
    """One demonstration -> Example whose labels are the response tokens (and their end token) only.

    Too long: prompt tokens are cut from the left ("truncated"); if the last response alone does not fit, the
    demonstration is dropped ("dropped"), never cut at the end (a response without its end token teaches the
    model not to stop). Returns (example or None, "ok" | "truncated" | "dropped" | "cut").

    cut_response=True is for scoring, never for training: a reward model reads its score at the last token, so
    instead of being dropped, a demonstration whose last response does not fit with at least one prompt token keeps
    its last max_length tokens ("cut": the prompt is gone and, past it, the start of the response).
    """
    ids, labels = _encode_full(tokenizer, demo, fmt)
    if len(ids) <= max_length:
        return Example(ids, labels), "ok"
    cut = len(ids) - max_length
    last_run = max(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    while last_run > 0 and labels[last_run - 1] != IGNORE_INDEX:
        last_run -= 1  # start of the final response
    if cut >= last_run:  # at least one prompt token must stay: the first response token is predicted from it
        return (Example(ids[cut:], labels[cut:]), "cut") if cut_response else (None, "dropped")
    return Example(ids[cut:], labels[cut:]), "truncated"


def encode_demonstrations(tokenizer, demos: Iterable[Demonstration], fmt: str, max_length: int) -> list[Example]:
    """Encode all, with one counted warning for truncated prompts and one for dropped demonstrations."""
    examples, counts = [], {"ok": 0, "truncated": 0, "dropped": 0}
    for demo in demos:
        ex, status = encode_demonstration(tokenizer, demo, fmt, max_length)
        counts[status] += 1
        if ex is not None:
            examples.append(ex)
    if counts["truncated"]:
        warnings.warn(f"{counts['truncated']} demonstration(s) longer than stage.max_length={max_length}: their "
                      "prompts were cut from the left; responses kept whole", stacklevel=2)
    if counts["dropped"]:
        warnings.warn(f"{counts['dropped']} demonstration(s) dropped: the response alone exceeds stage.max_length="
                      f"{max_length}; raise stage.max_length (and the model's context) to keep them", stacklevel=2)
    if not examples:
        raise DataError(f"no demonstration fits in stage.max_length={max_length}")
    return examples


def trajectory_example(prompt_ids: Sequence[int], response_ids: Sequence[int], labels: Sequence[int]) -> Example:
    """A learner trajectory as a training sequence whose targets are the expert's labels of the visited states.

    labels[t] is the expert's next token after response_ids[:t]; the logit at the last prompt token predicts
    labels[0], the one after response_ids[t] predicts labels[t + 1]. When there is one label more than response
    tokens (the rollout did not stop), a pad input slot carries the last label.
    """
    ids = list(prompt_ids) + list(response_ids)
    n = len(labels)
    if n == len(response_ids) + 1:
        ids = ids + [0]  # input of the slot is never read: nothing comes after it
    elif n != len(response_ids):
        raise ValueError(f"{n} labels for {len(response_ids)} response tokens")
    return Example(ids, [IGNORE_INDEX] * len(prompt_ids) + list(labels))


def count_labels(examples: Sequence[Example]) -> int:
    """Expert labels in `examples`: positions that take loss."""
    return sum(sum(l != IGNORE_INDEX for l in ex.labels) for ex in examples)


def label_trajectory(expert: Expert, prompt: Prompt, prompt_ids: Sequence[int], response_ids: Sequence[int],
                     stop_id: int) -> Example:
    """The expert's labels of every state the trajectory visited, as a training example. A trajectory that ended
    with the stop token has no state after it; one cut at the length limit keeps its last state."""
    labels = expert.next_token_labels(prompt, prompt_ids, response_ids)
    if response_ids and response_ids[-1] == stop_id:
        labels = labels[:-1]
    return trajectory_example(prompt_ids, response_ids, labels)


def trim_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The response up to and including its first stop token (padding after it removed)."""
    out = []
    for t in ids:
        out.append(int(t))
        if t in stop_ids:
            break
    return out


def _force(scores, row: int, token: int) -> None:
    """Make `token` the only choice of row `row` (greedy decoding then emits it)."""
    scores[row, :] = float("-inf")
    scores[row, token] = 0.0


class _ExpertMixer:
    """A logits processor: in each state, with probability beta, the expert's token replaces the learner's choice."""

    def __init__(self, beta: float, rng: random.Random, width: int, choose: Callable[[int, list[int]], int],
                 stop_id: int):
        self.beta, self.rng, self.width, self.choose, self.stop_id = beta, rng, width, choose, stop_id

    def __call__(self, input_ids, scores):
        for i in range(input_ids.size(0)):
            prefix = input_ids[i, self.width :].tolist()
            if self.stop_id in prefix or self.rng.random() >= self.beta:
                continue
            _force(scores, i, self.choose(i, prefix))
        return scores


class _EnvironmentForcer:
    """A logits processor, after every other: where the task's environment has text to append (`Task.environment`),
    its next token replaces whatever the learner or the expert chose."""

    def __init__(self, task: Task, prompts: Sequence[Prompt], tokenizer, width: int, stop_id: int):
        self.task, self.prompts, self.tokenizer, self.width, self.stop_id = task, prompts, tokenizer, width, stop_id

    def __call__(self, input_ids, scores):
        for i in range(input_ids.size(0)):
            prefix = input_ids[i, self.width :].tolist()
            if self.stop_id in prefix:
                continue
            text = self.tokenizer.decode(prefix, skip_special_tokens=True)
            forced = self.task.environment(self.prompts[i], text)
            if forced:
                ids = self.tokenizer(forced, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ExpertError(f"task {self.task.name}: its environment's text {forced!r} after response "
                                      f"prefix {text!r} (prompt {self.prompts[i].text!r}) tokenises to nothing")
                _force(scores, i, ids[0])
        return scores


def rollout(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, stop_id: int,
            expert: Expert | None = None, prompts: Sequence[Prompt] | None = None, beta: float = 0.0,
            rng: random.Random | None = None, batch_size: int = 64, task: Task | None = None) -> list[list[int]]:
    """Greedy rollouts of the mixture policy beta * expert + (1 - beta) * learner; each response ends at its stop.
    A task with an environment (`task`, else the expert's task) has its observations forced into the responses
    (`prompts` needed)."""
    from transformers import LogitsProcessorList

    gen = HFGenerator(model, tokenizer, [stop_id])
    settings = SamplingSettings(max_new_tokens=max_new_tokens, do_sample=False)
    rng = rng or random.Random(0)
    task = task if task is not None else getattr(expert, "task", None)
    environment = task is not None and task.has_environment
    if environment and prompts is None:
        raise ValueError(f"task {task.name} has an environment: rollout() needs the prompts to ask it")
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        width = max(len(p) for p in chunk)
        processors = []
        if beta > 0 and expert is not None:
            choose = lambda i, prefix, s=start: expert.next_token(prompts[s + i], prompt_ids[s + i], prefix)  # noqa: E731
            processors.append(_ExpertMixer(beta, rng, width, choose, stop_id))
        if environment:
            processors.append(_EnvironmentForcer(task, prompts[start : start + batch_size], tokenizer, width, stop_id))
        result = gen.generate_ids(chunk, settings, logits_processor=LogitsProcessorList(processors) if processors
                                  else None)
        out.extend(trim_at_stop(r, [stop_id]) for r in result.response_ids.tolist())
    return out


def evaluate_task(model, tokenizer, task: Task, prompts: Sequence[Prompt], fmt: str, max_new_tokens: int,
                  expert: Expert | None = None, encode: Callable[[str], list[int]] | None = None,
                  ) -> tuple[dict[str, float], list[str]]:
    """Greedy decoding on `prompts`: mean gold score, exact-match rate (for a task whose gold has an exactly-right
    level, `task.exact_score`) and (with an expert) mistakes per sequence, i.e. the states along the learner's own
    trajectory where its token differs from the expert's."""
    stop_id = stop_token_id(tokenizer, fmt)
    prompt_ids = [encode(p.text) if encode else encode_prompt(tokenizer, p.text, fmt) for p in prompts]
    responses = rollout(model, tokenizer, prompt_ids, max_new_tokens, stop_id, prompts=prompts, task=task)
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in responses]
    import torch

    from framework.reward import reward_scores

    # the contract of a reward source (a task may wrap one, e.g. a reward model as its gold): one number per text
    gold = reward_scores(task, task.golds(prompts, texts), len(texts), dtype=torch.float64, method="golds").tolist()
    metrics = {"eval/gold": sum(gold) / len(gold)}
    if task.exact_score is not None:
        metrics["eval/exact_match"] = sum(g >= task.exact_score for g in gold) / len(gold)
    if expert is not None:
        mistakes = []
        for p, ids, resp in zip(prompts, prompt_ids, responses):
            labels = expert.next_token_labels(p, ids, resp)
            mistakes.append(sum(int(a != b) for a, b in zip(resp, labels)))
        metrics["eval/mistakes_per_seq"] = sum(mistakes) / len(mistakes)
    return metrics, texts
