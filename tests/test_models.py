"""Model plugin: build from config (GPT-2, Llama), load a local dir, clear errors for bad paths and keys; the AdamW
and schedule every training stage shares (its kernel, its keys)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from framework.errors import ConfigError
from framework.models import CausalLMFactory, context_length, count_parameters, load_causal_lm
from framework.stages.common import adamw_warmup_cosine, use_fused_adamw, warmup_cosine


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


def test_a_damaged_model_dir_is_named_with_its_setting(tmp_path):
    """A truncated config.json or weights file (a copy cut short, a full disk) is a ConfigError naming the setting
    and the fix, not a transformers or safetensors traceback."""
    model = CausalLMFactory(arch="gpt2", n_layer=1, n_head=2, n_embd=32, n_positions=64).build(FakeTok())
    for damaged in ("config.json", "model.safetensors"):
        out = tmp_path / damaged
        model.save_pretrained(out)
        data = (out / damaged).read_bytes()
        (out / damaged).write_bytes(data[: len(data) // 2])
        with pytest.raises(ConfigError, match=rf"policy.path='{out}': cannot read the saved model.*incomplete or "
                                              r"damaged: export it again, or point policy.path at another one"):
            load_causal_lm(str(out), key="policy.path")


def test_a_hub_id_that_cannot_be_fetched_is_not_called_a_damaged_folder():
    from framework.models import fetched_from_hub

    with pytest.raises(ConfigError, match=r"model.path='gpt3-typo': cannot fetch the model from the Hugging Face Hub "
                                          r"\(404 not found\); check the id and the network"):
        with fetched_from_hub("model.path", "gpt3-typo"):
            raise OSError("404 not found")


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


def fit_tiny_regression(optimizer=None, **trainer_kwargs):
    """Two steps of a TrainingModule (the stages' module) on a linear model: the cheapest stage-like fit."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from framework.stages.lm_module import TrainingModule

    class Regression(TrainingModule):
        def __init__(self):
            super().__init__(optimizer or {"lr": 1e-2}, {"warmup_steps": 1})
            self.net = torch.nn.Linear(4, 1)

        def train_loss(self, batch):
            x, y = batch
            return ((self.net(x) - y) ** 2).mean(), {}

        def throughput(self, batch):
            return "rows", len(batch[0])

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(Regression(), DataLoader(data, batch_size=4))
    return trainer


def test_mixed_precision_with_gradient_clipping_trains():
    """trainer.precision=bf16-mixed with clipping crashed every clipping stage: the automatic fused AdamW unscales its
    own gradients, and Lightning refuses to clip those. It trains, with the foreach kernel."""
    trainer = fit_tiny_regression(precision="bf16-mixed", gradient_clip_val=1.0)
    assert trainer.global_step == 2
    group = trainer.optimizers[0].param_groups[0]
    assert not group["fused"] and group["foreach"]
    with pytest.raises(ConfigError, match=r"stage.optimizer.fused=true with trainer.precision=bf16-mixed and "
                                          r"trainer.gradient_clip_val=1.0: .*set stage.optimizer.fused=auto"):
        fit_tiny_regression({"lr": 1e-2, "fused": True}, precision="bf16-mixed", gradient_clip_val=1.0)
    trainer = fit_tiny_regression(precision="32-true", gradient_clip_val=1.0)
    assert trainer.optimizers[0].param_groups[0]["fused"]  # full precision keeps the fused kernel


def test_which_adamw_kernel():
    """`stage.optimizer.fused`: auto is fused at full precision or without clipping; under mixed precision with
    clipping auto is not fused and an explicit true is refused, naming the setting that clips."""
    lin = torch.nn.Linear(2, 2)
    assert use_fused_adamw(lin, "auto", "32-true", 1.0)  # torch >= 2.4 on CPU
    assert use_fused_adamw(lin, "auto", "bf16-mixed", None)  # nothing to clip
    assert not use_fused_adamw(lin, "auto", "bf16-mixed", 1.0)
    assert not use_fused_adamw(lin, "auto", "16-mixed", 0.5)
    assert use_fused_adamw(lin, True, "bf16-true", 1.0) is True and use_fused_adamw(lin, False) is False
    with pytest.raises(ConfigError, match=r"fused=true with trainer.precision=16-mixed and stage.gradient_clip=1.0: .*"
                                          r"or stage.gradient_clip=null"):
        use_fused_adamw(lin, True, "16-mixed", 1.0, "stage.gradient_clip")
    with pytest.raises(ConfigError, match="stage.optimizer.fused='yes': use true, false or auto"):
        use_fused_adamw(lin, "yes")


def test_misspelt_optimizer_and_scheduler_keys_are_refused():
    """`+stage.optimizer.weight_decayy=0.1` was silently ignored; it is refused with the closest key, when the stage is
    built (before any work) and in `adamw_warmup_cosine` itself."""
    from hydra import compose, initialize_config_module

    from framework.instantiate import instantiate_plugin
    from framework.interfaces import Stage

    lin = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"unknown key stage.optimizer.weight_decayy \(did you mean "
                                          r"stage.optimizer.weight_decay\?\): stage.optimizer takes betas, eps, "
                                          r"fused, lr, weight_decay"):
        adamw_warmup_cosine(lin, 10, {"lr": 1e-3, "weight_decayy": 0.1}, {})
    with pytest.raises(ConfigError, match=r"unknown key stage.scheduler.warmup \(did you mean "
                                          r"stage.scheduler.warmup_steps\?\)"):
        adamw_warmup_cosine(lin, 10, {"lr": 1e-3}, {"warmup": 5})
    for stage in ("pretrain", "sft", "reward_model"):
        with initialize_config_module(config_module="rlhf_conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"stage={stage}", "+stage.optimizer.weight_decayy=0.1"])
        with pytest.raises(ConfigError, match="unknown key stage.optimizer.weight_decayy"):
            instantiate_plugin(cfg.stage, "stage", Stage)


@pytest.mark.parametrize("override, message", [
    ("+stage.samples.temprature=0.5", r"unknown key stage.samples.temprature \(did you mean stage.samples.temperature"),
    ("stage.samples.prompts=hello", r"stage.samples.prompts='hello' must be a list of strings"),
    ("stage.samples.top_p=1.5", r"stage.samples.top_p=1.5 must be in \(0, 1\]"),
    ("stage.samples.max_new_tokens=0", r"stage.samples.max_new_tokens=0 must be >= 1"),
])
@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_a_wrong_samples_setting_is_refused_when_the_stage_is_built(stage, override, message):
    """stage.samples used to be read with .get() after training: a misspelt key was ignored, a bad value failed (or
    not) only then."""
    from hydra import compose, initialize_config_module

    from framework.instantiate import instantiate_plugin
    from framework.interfaces import Stage

    with initialize_config_module(config_module="rlhf_conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"stage={stage}", override])
    with pytest.raises(ConfigError, match=message):
        instantiate_plugin(cfg.stage, "stage", Stage)


@pytest.mark.parametrize("stage, override, message", [
    ("reward_model", "+stage.normalize.sampels=0", r"unknown key stage.normalize.sampels \(did you mean "
                                                   r"stage.normalize.samples\?\)"),
    ("reward_model", "stage.normalize.target_std=0", r"stage.normalize.target_std=0 must be > 0"),
    ("reward_model", "stage.normalize.samples=-1", r"stage.normalize.samples=-1 must be >= 0 \(0: no normalisation\)"),
    ("reward_model", "stage.normalize.temperature=null", r"stage.normalize.temperature=None is not a finite number"),
    ("sft", "+stage.eval.prompt=8", r"unknown key stage.eval.prompt \(did you mean stage.eval.prompts\?\)"),
    ("sft", "stage.eval.prompts=0", r"stage.eval.prompts=0 must be >= 1"),
    # the reward stage's sizes: they were checked only after it had sampled the policy's replies
    ("reward_model", "stage.batch_size=0", r"stage.batch_size=0 must be >= 1"),
    ("reward_model", "stage.max_length=1", r"stage.max_length=1 must be >= 2 \(tokens\)"),
    ("reward_model", "stage.val_fraction=1.0", r"stage.val_fraction=1 must be in \[0, 1\)"),
    ("reward_model", "stage.epochs=0", r"stage.epochs=0 must be > 0"),
    # pretrain's and sft's sizes, checked when built as the reward stage's are (they were checked in run())
    ("pretrain", "stage.seq_len=1", r"stage.seq_len=1 must be >= 2 \(tokens\)"),
    ("pretrain", "stage.batch_size=0", r"stage.batch_size=0 must be >= 1"),
    ("sft", "stage.val_fraction=-0.1", r"stage.val_fraction=-0.1 must be in \[0, 1\)"),
    ("sft", "stage.max_length=0", r"stage.max_length=0 must be >= 2 \(tokens\)"),
    # a number of batches over every process (ValidationShare's limit): -1 would validate on nothing, silently
    ("sft", "stage.val_batches=-1", r"stage.val_batches=-1 must be >= 0 \(0 or null: all\)"),
    ("pretrain", "stage.val_batches=0.5", r"stage.val_batches=0.5 must be a whole number"),
    # values of the wrong kind, by key (they failed inside the constructor, or after the model was built)
    ("rl", "stage.iterations=abc", r"stage.iterations='abc' must be a whole number$"),
    ("rl", "stage.reward_clip=high", r"stage.reward_clip='high' must be a number \(or null\)"),
    ("rl", "stage.logprobs_from_sampling=1", r"stage.logprobs_from_sampling=1 must be true or false"),
    ("sft", "stage.batch_size=1.5", r"stage.batch_size=1.5 must be a whole number"),
    ("reward_model", "stage.epochs=abc", r"stage.epochs='abc' must be a number \(or null\)"),
    ("pretrain", "stage.optimizer.lr=-1", r"stage.optimizer.lr=-1 must be >= 0 \(e.g. 1e-4\)"),
    ("pretrain", "stage.optimizer.lr=abc", r"stage.optimizer.lr='abc' is not a finite number"),
    ("sft", "stage.optimizer.betas=[0.9,1.5]", r"stage.optimizer.betas\[1\]=1.5 must be in \[0, 1\)"),
    ("sft", "stage.optimizer.betas=0.9", r"stage.optimizer.betas=0.9 must be two numbers"),
    ("reward_model", "stage.scheduler.warmup_steps=-1", r"stage.scheduler.warmup_steps=-1 must be >= 0"),
    ("rl", "stage.scheduler.min_lr_ratio=2", r"stage.scheduler.min_lr_ratio=2 must be in \[0, 1\]"),
])
def test_a_wrong_stage_setting_is_refused_when_the_stage_is_built(stage, override, message):
    from hydra import compose, initialize_config_module

    from framework.instantiate import instantiate_plugin
    from framework.interfaces import Stage

    with initialize_config_module(config_module="rlhf_conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"stage={stage}", override])
    with pytest.raises(ConfigError, match=message):
        instantiate_plugin(cfg.stage, "stage", Stage)


def test_the_stages_settings_read_their_yaml_and_default_to_it():
    """Each stage's sections come through as their settings classes, with the yaml's values; a settings class's own
    defaults are the yaml's (but for the sample prompts, which differ by stage), so a stage built in code samples,
    normalises and evaluates as the CLI's does."""
    from dataclasses import asdict

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from framework.instantiate import instantiate_plugin
    from framework.interfaces import Stage
    from framework.stages.common import SampleSettings
    from framework.stages.reward import NormalizeSettings
    from framework.stages.sft import SFTEvalSettings

    for stage, attribute, cls in (("pretrain", "samples", SampleSettings), ("sft", "samples", SampleSettings),
                                  ("sft", "eval", SFTEvalSettings), ("reward_model", "normalize", NormalizeSettings)):
        with initialize_config_module(config_module="rlhf_conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"stage={stage}"])
        section = OmegaConf.to_container(cfg.stage[attribute])
        built = getattr(instantiate_plugin(cfg.stage, "stage", Stage), attribute)
        assert isinstance(built, cls) and set(section) == set(asdict(built)), (stage, attribute)
        for key, value in section.items():
            assert getattr(built, key) == (tuple(value) if isinstance(value, list) else value), (stage, key)
            if key != "prompts":
                assert getattr(cls(), key) == value, (stage, key)
    assert SampleSettings.from_config({"prompts": None}).prompts == ()


def test_settings_accept_their_edges_and_omegaconf_nodes():
    from omegaconf import OmegaConf

    from framework.stages.common import SampleSettings
    from framework.stages.reward import NormalizeSettings

    edge = SampleSettings.from_config({"prompts": [], "top_p": 1, "temperature": 2, "max_new_tokens": 1})
    assert edge == SampleSettings(prompts=(), max_new_tokens=1, temperature=2.0, top_p=1.0)
    assert isinstance(edge.temperature, float) and isinstance(edge.top_p, float)
    assert NormalizeSettings.from_config({"target_mean": -1, "samples": 0}).target_mean == -1.0
    # a node of a composed config: interpolations resolved, lists read
    node = OmegaConf.create({"greeting": "Hi", "samples": {"prompts": ["${greeting} there"], "top_p": 0.5}}).samples
    assert SampleSettings.from_config(node).prompts == ("Hi there",)
    for bad, message in (({"prompts": 0}, "must be a list of strings"), ({"prompts": ""}, "must be a list of strings"),
                         ("hello", r"stage.samples='hello' must be a mapping of its keys \(prompts, max_new_tokens")):
        with pytest.raises(ConfigError, match=message):
            SampleSettings.from_config(bad)


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


def test_epoch_batches_count_one_process_share_of_the_examples():
    """What one rank's loader yields per epoch when Lightning's DistributedSampler splits the data (each rank gets
    ceil(n / world), a few repeated): whole batches only, unless a rank's share makes less than one."""
    from framework.stages.common import epoch_batches

    assert epoch_batches(36, 8) == (4, True)
    assert epoch_batches(36, 8, 2) == (2, True)  # 18 each
    assert epoch_batches(37, 8, 2) == (2, True)  # 19 each, one repeated
    assert epoch_batches(8, 8) == (1, False) and epoch_batches(5, 8) == (1, False)
    assert epoch_batches(12, 8, 2) == (1, False)  # 6 each: one short batch, not none


def test_reward_model_loader_drops_its_last_batch_by_the_process_share():
    """12 comparisons at batch 8 over 2 processes: 6 each make one short batch; dropping it (12 > 8) left none."""
    from framework.stages.common import epoch_batches
    from framework.stages.reward import ComparisonDataModule, Group

    groups = [Group([[1, 2], [3]], None, None) for _ in range(12)]
    for shards, dropped in ((1, True), (2, False)):  # one process: a whole batch and a dropped 4
        drop_last = epoch_batches(len(groups), 8, shards)[1]
        assert drop_last is dropped
        data = ComparisonDataModule(groups, [], 8, pad_id=0, group_by_length=False, drop_last=drop_last)
        assert data.train_dataloader().drop_last is dropped


def test_data_shards_follow_the_trainer_and_its_sampler_setting(tmp_path):
    """The processes the trainer config asks for (2 CPU processes under DDP), 1 when Lightning's distributed sampler
    is off (every process reads all the data); a `trainer.max_steps=null`, which epoch-sized stages ignore, does not
    break it."""
    from omegaconf import OmegaConf

    from framework.interfaces import StageContext
    from framework.stages.common import data_shards

    def shards(**trainer):
        cfg = OmegaConf.create({"trainer": {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu",
                                            "max_steps": None, **trainer}})
        return data_shards(StageContext(cfg=cfg, output_dir=tmp_path, run=None))

    assert shards(devices=1) == 1
    assert shards(devices=2, strategy="ddp") == 2
    assert shards(devices=2, strategy="ddp", use_distributed_sampler=False) == 1


def test_a_resumed_fit_that_trains_nothing_says_so_and_how_to_go_on(capsys):
    """Lightning returns silently from a fit whose checkpoint is already at the run's end: the stages' trainers say
    so, with how to lengthen the run; a fit that trained, or one not resumed, says nothing."""
    from types import SimpleNamespace

    from framework.stages.common import nothing_trained_notice

    notice = nothing_trained_notice("raise stage.epochs and pass ckpt_path=<this checkpoint>")
    resumed = SimpleNamespace(ckpt_path="/runs/a/checkpoints/last.ckpt", is_global_zero=True, global_step=7)
    module = SimpleNamespace()
    notice.on_fit_start(resumed, module)
    notice.on_fit_end(resumed, module)
    out = capsys.readouterr().out
    assert "nothing to train: /runs/a/checkpoints/last.ckpt is already at the end of the run (step 7)" in out
    assert "raise stage.epochs and pass ckpt_path=<this checkpoint>" in out
    notice.on_fit_start(resumed, SimpleNamespace(iteration=24))  # the RL module counts iterations
    notice.on_fit_end(resumed, SimpleNamespace(iteration=24))
    assert "(iteration 24)" in capsys.readouterr().out
    notice.on_fit_start(resumed, module)
    notice.on_train_batch_start(resumed, module, None, 0)
    notice.on_fit_end(resumed, module)
    notice.on_fit_start(SimpleNamespace(ckpt_path=None, is_global_zero=True, global_step=0), module)
    notice.on_fit_end(SimpleNamespace(ckpt_path=None, is_global_zero=True, global_step=0), module)
    assert capsys.readouterr().out == ""
