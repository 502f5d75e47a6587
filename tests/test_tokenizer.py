"""Tokenizer plugins and conventions: training, cache, PAD != EOS, chat template, loading errors."""

import json

import pytest
from transformers import AutoTokenizer

from framework.errors import ConfigError
from framework.tokenization import EOS_TOKEN, PAD_TOKEN, TURN_END, load_tokenizer, stop_token_ids
from plugins.datasets.chitchat import ChitchatCorpus
from plugins.tokenizers.bpe import ByteLevelBPETrainer
from plugins.tokenizers.pretrained import PretrainedTokenizer


@pytest.fixture(scope="module")
def corpus():
    return [t.text for t in ChitchatCorpus(max_documents=300).texts()]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok")
    source = ByteLevelBPETrainer(vocab_size=600)
    return source, source.build(corpus, cache), cache


def test_bpe_has_distinct_pad_and_eos_and_round_trips(trained):
    _, tok, _ = trained
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == 600
    text = "Hi there! Ünïcode ☃ and   spaces\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: no unknown tokens, exact round trip
    assert stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids(TURN_END)]


def test_bpe_is_cached_by_corpus_and_settings(corpus, trained):
    source, tok, cache = trained
    assert source.last_trained
    again = ByteLevelBPETrainer(vocab_size=600)
    tok2 = again.build(corpus, cache)
    assert not again.last_trained and tok2.get_vocab() == tok.get_vocab()
    other = ByteLevelBPETrainer(vocab_size=700)
    other.build(corpus, cache)
    assert other.last_trained  # different settings -> a new entry
    changed = ByteLevelBPETrainer(vocab_size=600)
    changed.build(corpus[:-1], cache)
    assert changed.last_trained  # different corpus -> a new entry


def test_chat_template_round_trip_and_assistant_mask(trained):
    _, tok, _ = trained
    messages = [
        {"role": "user", "content": "hello, how are you?"},
        {"role": "assistant", "content": "fine thanks"},
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "still fine"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>user\nhello, how are you?<|im_end|>\n<|im_start|>assistant\nfine thanks<|im_end|>\n"
                    "<|im_start|>user\nand now?<|im_end|>\n<|im_start|>assistant\nstill fine<|im_end|>\n")
    enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert tok.decode(ids) == text
    trained_text = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained_text == "fine thanks<|im_end|>still fine<|im_end|>"  # every assistant turn, with its turn end
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_saved_tokenizer_loads_with_plain_transformers(trained, tmp_path):
    _, tok, _ = trained
    tok.save_pretrained(str(tmp_path))
    plain = AutoTokenizer.from_pretrained(str(tmp_path))
    assert plain.pad_token_id == tok.pad_token_id and plain.eos_token_id == tok.eos_token_id
    assert plain.chat_template == tok.chat_template
    assert PretrainedTokenizer(str(tmp_path)).build([], tmp_path).get_vocab() == tok.get_vocab()
    # the inputs are named in the saved config: transformers 4.x would otherwise hand a fast tokenizer's
    # token_type_ids to the model, and GPT-2 adds them to its embeddings (an exported reward model scored differently)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_input_names"] == ["input_ids",
                                                                                                "attention_mask"]
    assert list(plain("hi there")) == ["input_ids", "attention_mask"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no tokenizer"):
        load_tokenizer(tmp_path)


def test_a_tokenizer_without_chat_template_gets_ours_with_single_token_turn_markers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1, "hello": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.chat_template and tok.pad_token_id != tok.eos_token_id
    ids = tok.apply_chat_template([{"role": "assistant", "content": "hello"}], tokenize=True, return_dict=True)
    assert tok.convert_tokens_to_ids(TURN_END) in ids["input_ids"]  # one token, so a model can learn to emit it
