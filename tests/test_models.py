"""Model plugin: build from config (GPT-2, Llama), load a local dir, clear errors for bad paths and keys."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from framework.errors import ConfigError
from framework.models import CausalLMFactory, context_length, count_parameters, load_causal_lm
from framework.stages.common import warmup_cosine


class FakeTok:
    bos_token_id, eos_token_id, pad_token_id = 0, 0, 1

    def __len__(self):
        return 300


def test_builds_gpt2_and_llama_from_config():
    gpt = CausalLMFactory(arch="gpt2", n_layer=1, n_head=2, n_embd=32, n_positions=64).build(FakeTok())
    assert gpt.config.vocab_size == 300 and gpt.config.pad_token_id == 1 and context_length(gpt) == 64
    llama = CausalLMFactory(arch="llama", num_hidden_layers=1, num_attention_heads=2, hidden_size=32,
                            intermediate_size=64, max_position_embeddings=64).build(FakeTok())
    assert llama.config.model_type == "llama" and context_length(llama) == 64
    assert count_parameters(gpt) < sum(p.numel() for p in gpt.state_dict().values())  # tied weights counted once
    assert gpt(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 300)


def test_unknown_config_keys_are_errors_with_hints():
    with pytest.raises(ConfigError, match="n_layers.*did you mean n_layer"):
        CausalLMFactory(arch="gpt2", n_layers=2).build(FakeTok())
    with pytest.raises(ConfigError, match="not a transformers model type"):
        CausalLMFactory(arch="gpt7").build(FakeTok())


def test_model_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist locally.*allow_download"):
        load_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        load_causal_lm(str(tmp_path))
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        load_causal_lm(str(tmp_path / "f.bin"))


def test_loads_a_saved_dir_and_rejects_a_non_causal_lm(tmp_path):
    model = CausalLMFactory(arch="gpt2", n_layer=1, n_head=2, n_embd=32, n_positions=64).build(FakeTok())
    model.save_pretrained(tmp_path / "lm")
    loaded = CausalLMFactory(path=str(tmp_path / "lm")).build(FakeTok())
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    encoder_cfg = AutoConfig.for_model("distilbert", vocab_size=300, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    AutoModelForSequenceClassification.from_config(encoder_cfg).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ConfigError, match="not a causal LM"):
        load_causal_lm(str(tmp_path / "encoder"))


def test_a_loaded_model_trains_with_its_dropout_on(tmp_path):
    """from_pretrained hands out eval mode and Lightning keeps it at fit start, so the model source must switch a
    loaded model to train mode, or fine-tuning a model saved with dropout would silently run without it."""
    saved = CausalLMFactory(arch="gpt2", n_layer=1, n_head=2, n_embd=32, n_positions=64, resid_pdrop=0.5,
                            embd_pdrop=0.5).build(FakeTok())
    saved.save_pretrained(tmp_path / "lm")
    loaded = CausalLMFactory(path=str(tmp_path / "lm")).build(FakeTok())
    assert all(m.training for m in loaded.modules())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.equal(loaded(ids).logits, loaded(ids).logits)  # dropout is live


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_gelu_new_is_swapped_for_the_fused_kernel(tmp_path):
    """Loaded and built GPT-2s run PyTorch's fused tanh-GELU instead of transformers' Python one: same outputs to
    float rounding, and the saved config still says gelu_new."""
    from transformers import GPT2LMHeadModel
    from transformers.activations import NewGELUActivation

    def fused(model):
        python = [m for m in model.modules() if isinstance(m, NewGELUActivation)]
        kernel = [m for m in model.modules() if isinstance(m, torch.nn.GELU) and m.approximate == "tanh"]
        return not python and len(kernel) == model.config.n_layer

    torch.manual_seed(0)
    built = CausalLMFactory(arch="gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=64).build(FakeTok())
    assert fused(built)
    built.save_pretrained(tmp_path)
    plain = GPT2LMHeadModel.from_pretrained(tmp_path).eval()  # transformers' own: the Python gelu_new
    assert plain.config.activation_function == "gelu_new" and not fused(plain)
    loaded = load_causal_lm(str(tmp_path)).eval()
    assert fused(loaded)
    ids = torch.randint(2, 300, (2, 10))
    assert torch.allclose(loaded(ids).logits, plain(ids).logits, atol=1e-5)


def test_training_forwards_build_no_kv_cache():
    """Forwards that are not decoding pass use_cache=False where the model takes it: transformers' LMs otherwise
    build a KV cache on every training forward. A model whose forward has no such parameter gets nothing extra."""
    from framework.models import forward_takes, no_cache

    gpt = CausalLMFactory(arch="gpt2", n_layer=1, n_head=2, n_embd=32, n_positions=64).build(FakeTok())
    ids = torch.tensor([[1, 2, 3]])
    assert gpt(ids).past_key_values is not None  # transformers' default
    assert no_cache(gpt) == {"use_cache": False} and gpt(ids, **no_cache(gpt)).past_key_values is None
    assert no_cache(gpt.transformer) == {"use_cache": False}

    class Plain(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    assert no_cache(Plain()) == {} and not forward_takes(Plain, "logits_to_keep")
    assert forward_takes(type(gpt), "logits_to_keep")
