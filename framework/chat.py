"""`rlhf chat model.path=DIR`: talk to a model in the terminal.

How a chat model "keeps a conversation back and forth": it has no memory of its own. Each turn, the whole
conversation so far (system, user and assistant turns) is rendered through the tokenizer's chat template into one
prompt, the model continues it until its turn-end token, and that reply is appended to the history for the next
turn. When the history outgrows the context, the oldest turns are dropped.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path
from typing import TextIO

from framework.errors import ConfigError, DataError, RLHFError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rlhf chat",
        description="Chat with a model. Interactive when stdin is a terminal; otherwise (or with --no-interactive) "
                    "each line of stdin or --prompts FILE is the next user turn of one conversation.",
    )
    parser.add_argument("overrides", nargs="*", metavar="model.path=DIR", help="the model directory to load")
    parser.add_argument("--model", help="same as model.path=DIR")
    parser.add_argument("--prompts", help="read user turns from this file (one per line), print the conversation")
    parser.add_argument("--no-interactive", action="store_true", help="read user turns from stdin without prompting")
    parser.add_argument("--separate", action="store_true", help="batch mode: each line is its own conversation")
    parser.add_argument("--system", default=None, help="a system message to start each conversation with")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the longest reply, in tokens (>= 1)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature (> 0; --greedy for deterministic replies)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key != "model.path":
            parser.error(f"unknown argument {item!r}; chat takes model.path=DIR")
        args.model = value
    if not args.model:
        parser.error("give the model to chat with: rlhf chat model.path=DIR")
    # refused here, not by `generate` with a traceback (or, for --top-p, not at all)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {args.max_new_tokens}: give at least 1 (the longest reply, in tokens)")
    if not math.isfinite(args.temperature) or args.temperature < 0 or (args.temperature == 0 and not args.greedy):
        parser.error(f"--temperature {args.temperature:g}: give a number > 0"
                     + ("; for deterministic replies use --greedy instead of --temperature 0"
                        if args.temperature == 0 else ""))
    if not 0 < args.top_p <= 1:  # NaN fails too
        parser.error(f"--top-p {args.top_p:g}: give a number in (0, 1] (1 samples from the whole distribution)")
    return args


def read_prompts(path: str) -> TextIO:
    """The --prompts file, read and decoded whole before the model loads, so a bad file stops the chat before any
    turn: UTF-8 (with or without a byte-order mark), one user turn a line."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"--prompts {path}: cannot read it ({err.strerror or err}); give a text file with one user "
                          "turn a line") from None
    try:
        return io.StringIO(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"--prompts is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}): save it as "
                        f"UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > prompts-utf8.txt`", path, line) from None


class ChatSession:
    """Keeps the message history and renders it through the chat template each turn."""

    def __init__(self, model, tokenizer, system: str | None, max_new_tokens: int, sampling):
        from framework.models import context_length
        from framework.rollout import HFGenerator
        from framework.tokenization import stop_token_ids

        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.generator = HFGenerator(model, tokenizer, stop_token_ids(tokenizer))
        self.sampling = sampling
        self.budget = (context_length(model) or 2048) - max_new_tokens
        if self.budget <= 8:
            raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for the conversation in the model's "
                              f"context of {context_length(model)} tokens; lower it")
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self) -> tuple[list[int], int]:
        """The conversation rendered for generation; drops the oldest user/assistant exchanges until it fits (a
        system message stays). Returns (ids, turns dropped)."""
        def render(messages: list[dict]) -> list[int]:
            return list(self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                           return_dict=True)["input_ids"])

        first = 1 if self.system else 0
        alone = render(self.messages[:first] + self.messages[-1:])
        if len(alone) > self.budget:
            self.messages.pop()  # the new turn alone is too long: keep the history as it was
            raise ConfigError(f"that message is {len(alone)} tokens with the chat template; at most {self.budget} "
                              "fit (shorten it, or lower --max-new-tokens)")
        dropped = 0
        while len(ids := render(self.messages)) > self.budget:
            del self.messages[first : first + 2]  # one exchange: the user turn and the reply to it
            dropped += 2
        return ids, dropped

    def reply(self, user_text: str) -> tuple[str, int]:
        self.messages.append({"role": "user", "content": user_text})
        ids, dropped = self._prompt_ids()
        out = self.generator.generate_ids([ids], self.sampling)
        text = self.tokenizer.decode(out.response_ids[0], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": text})
        return text, dropped


def run_chat(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> int:
    import torch

    from framework.models import load_causal_lm
    from framework.rollout import SamplingSettings
    from framework.tokenization import load_tokenizer

    prompts = read_prompts(args.prompts) if args.prompts else None
    tokenizer = load_tokenizer(args.model)
    if not tokenizer.chat_template:
        raise ConfigError(f"{args.model!r}: the tokenizer has no chat template")
    model = load_causal_lm(args.model).eval()
    torch.manual_seed(args.seed)
    sampling = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                do_sample=not args.greedy)
    session = ChatSession(model, tokenizer, args.system, args.max_new_tokens, sampling)

    interactive = not (args.prompts or args.no_interactive) and stdin.isatty()
    lines = prompts if prompts is not None else stdin
    if interactive:
        print(f"chatting with {args.model} (/reset starts over, /quit or Ctrl-D ends)", file=stdout)
    try:
        while True:
            if interactive:
                print("you> ", end="", file=stdout, flush=True)
            try:
                line = lines.readline()
            except UnicodeDecodeError as err:  # piped text in another encoding (decoded a chunk at a time)
                raise DataError(f"standard input is not UTF-8 ({err.reason} at byte 0x{err.object[err.start]:02x}): "
                                "pipe UTF-8 text, e.g. through `iconv -f latin1 -t utf-8`, or give --prompts "
                                "<a UTF-8 file>") from None
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/reset":
                session.reset()
                print("(conversation reset)", file=stdout)
                continue
            if args.separate:
                session.reset()
            if not interactive:
                print(f"user> {text}", file=stdout)
            try:
                reply, dropped = session.reply(text)
            except ConfigError as err:
                print(f"(not sent: {err})", file=stdout)
                continue
            if dropped:
                print(f"(history trimmed: the oldest {dropped} turn(s) no longer fit the context)", file=stdout)
            print(f"bot> {reply}", file=stdout, flush=True)
    finally:
        if prompts is not None:
            prompts.close()
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        return run_chat(args, sys.stdin, sys.stdout)
    except RLHFError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
