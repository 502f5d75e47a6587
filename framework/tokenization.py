"""Tokenizer conventions shared by every stage: special tokens, the chat template, loading with clear errors.

PAD and EOS are always different tokens: with pad == eos the EOS is masked out of the SFT loss and the model never
learns to stop (RLHF_REFERENCE 1.2 item 9).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from framework.errors import ConfigError

if TYPE_CHECKING:
    import tokenizers
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN, TURN_START, TURN_END]

# ChatML-style. Assistant content sits in {% generation %} so `return_assistant_tokens_mask=True` marks exactly the
# tokens a model must learn to produce (content + turn end), which the SFT stage trains on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def wrap_tokenizer(tokenizer_object: "tokenizers.Tokenizer") -> "PreTrainedTokenizerFast":
    """Wrap a raw `tokenizers.Tokenizer` (which must contain SPECIAL_TOKENS) as a transformers tokenizer."""
    from transformers import PreTrainedTokenizerFast

    missing = [t for t in SPECIAL_TOKENS if tokenizer_object.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[TURN_START, TURN_END],
        padding_side="right",
        clean_up_tokenization_spaces=False,
        # saved in tokenizer_config.json: transformers 4.x otherwise gives a fast tokenizer token_type_ids too, which
        # GPT-2 and others add to the embeddings (a plain-transformers reload would score differently)
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def ensure_pad_token(tok: "PreTrainedTokenizerBase") -> "PreTrainedTokenizerBase":
    """Give `tok` a PAD token distinct from EOS (adding `<|pad|>` if needed; the model must then be resized)."""
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def stop_token_ids(tok: "PreTrainedTokenizerBase") -> list[int]:
    """Token ids that end a generation: EOS, and the chat turn end when the tokenizer has one."""
    ids = [tok.eos_token_id]
    turn_end = tok.convert_tokens_to_ids(TURN_END) if TURN_END in tok.get_vocab() else None
    if turn_end is not None and turn_end not in ids:
        ids.append(turn_end)
    return [i for i in ids if i is not None]


def has_tokenizer_files(path: Path) -> bool:
    return any((path / name).exists() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | Path, allow_download: bool = False) -> "PreTrainedTokenizerBase":
    """Load a tokenizer from a local directory (or a hub id when allow_download), with errors that say what is
    missing."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.exists() and allow_download:
        p = path  # a hub id
    elif not p.exists():
        raise ConfigError(f"tokenizer path {str(p)!r} does not exist")
    elif p.is_dir() and not has_tokenizer_files(p):
        raise ConfigError(
            f"{str(p)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). Save one there with "
            "tokenizer.save_pretrained(dir), or point tokenizer=pretrained tokenizer.path=<dir> at one"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=not allow_download)
    except Exception as err:  # transformers raises many types here; the path is what the user needs
        raise ConfigError(f"cannot load a tokenizer from {str(p)!r}: {err}") from err
    if tok.chat_template is None:
        # our template: its turn markers must be single special tokens (the model is resized to fit), else the
        # turn end would be trained as plain text and generation would never see a stop token
        tok.chat_template = CHAT_TEMPLATE
        missing = [t for t in (TURN_START, TURN_END) if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing})
    return ensure_pad_token(tok)
