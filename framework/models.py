"""Causal LMs: built from a `transformers` config (random init) or loaded from a local Hugging Face directory.

Nothing downloads unless the user sets `model.allow_download=true`; then `path` may be a hub id (real code path for
users with a network; tests use local paths).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from framework.errors import ConfigError, checked_number
from framework.interfaces import ModelSource

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def resolve_model_path(path: str, allow_download: bool = False, key: str = "model.path") -> str:
    """Return a loadable reference for `path`: a validated local HF dir, or a hub id when downloads are allowed.
    key: the setting that gave the path, named in every message."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ConfigError(
                f"{key}={path!r} is a folder but not a Hugging Face model directory (no config.json). "
                "Point it at a folder written by save_pretrained, e.g. the `model/` folder a stage exported"
            )
        return str(p)
    if p.exists():
        raise ConfigError(f"{key}={path!r} is a file; it must be a Hugging Face model directory")
    if allow_download:
        return path
    raise ConfigError(
        f"{key}={path!r} does not exist locally. Give the path of a saved model directory, e.g. the `model/` "
        "folder a stage exported (outputs/runs/<date>/<time>_sft/model), or set model.allow_download=true to fetch "
        "it from the Hugging Face Hub (needs a network)"
    )


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@contextlib.contextmanager
def fetched_from_hub(key: str, path: str, what: str = "model"):
    """Errors from fetching a model from the Hugging Face Hub (`allow_download=true`: a misspelt id, no network) as a
    ConfigError that names the setting, not as a damaged local folder."""
    try:
        yield
    except OSError as err:
        raise ConfigError(f"{key}={path!r}: cannot fetch the {what} from the Hugging Face Hub ({err}); check the id "
                          "and the network, or give a local model folder") from err


@contextlib.contextmanager
def readable_saved_dir(key: str, path: str | Path, what: str = "model"):
    """Errors from reading a saved model folder's files (a truncated config.json, weights or head file: OSError,
    JSON, safetensors or unpickling errors) as a ConfigError that names the setting that gave the folder."""
    import json
    import pickle

    from safetensors import SafetensorError

    try:
        yield
    except (OSError, json.JSONDecodeError, SafetensorError, pickle.UnpicklingError, EOFError) as err:
        raise ConfigError(f"{key}={str(path)!r}: cannot read the saved {what} ({type(err).__name__}: {err}). The "
                          f"folder is incomplete or damaged: export it again, or point {key} at another one") from err


@functools.cache
def forward_takes(model_type: type, name: str) -> bool:
    """Whether `model_type.forward` has a parameter `name` (cached per class: inspecting a signature costs more
    than a small model's forward op)."""
    try:
        return name in inspect.signature(model_type.forward).parameters
    except (TypeError, ValueError):
        return False


def no_cache(model: "torch.nn.Module") -> dict[str, bool]:
    """Keyword arguments for a forward that is not decoding: `use_cache=False` where the model takes it.
    transformers' LMs otherwise build a KV cache (a DynamicCache) on every call, even in training, which costs ~3%
    of a small model's forward and backward."""
    return {"use_cache": False} if forward_takes(type(model), "use_cache") else {}


def is_drop_rate(name: str, value: Any) -> bool:
    """Whether an attribute is a positive drop rate: a float whose name says so (`attention_dropout`, `resid_pdrop`,
    `layerdrop`, ...)."""
    return "drop" in name.lower() and type(value) is float and value > 0.0


@functools.cache
def reads_rates_from_config(layer_type: type) -> bool:
    """Whether a layer class reads a drop rate from `self.config` outside `__init__` (Falcon's decoder layer and
    attention, Persimmon's attention, GPT-Neo's flash attention), judged from its methods' source; a class whose
    source cannot be read counts as reading them."""
    for cls in layer_type.__mro__:
        if cls.__module__.startswith(("torch.", "builtins")):
            continue
        for name, member in vars(cls).items():
            if name == "__init__" or not inspect.isfunction(member):
                continue
            try:
                source = inspect.getsource(member)
            except (OSError, TypeError):
                return True
            if re.search(r"self\.config\.\w*drop", source, re.IGNORECASE):
                return True
    return False


class RatesOff:
    """A layer's view of its model config with every drop rate read as 0.0. Everything else is read from (and
    written to) the config itself, so a later change to it (e.g. the attention implementation) still reaches the
    layer, and the model's own `config`, the one an export saves, keeps its rates."""

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "config", config)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "config":  # copy/pickle probe a half-built object
            raise AttributeError(name)
        value = getattr(self.config, name)
        return 0.0 if is_drop_rate(name, value) else value

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.config, name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self.config, name)


def disable_dropout(model: "torch.nn.Module") -> "torch.nn.Module":
    """Dropout off for good, whatever mode the model is put in later (Lightning calls `.train()`), in place:
    - p = 0 in every dropout module (`nn.Dropout`, `Dropout1d/2d/3d`, `AlphaDropout`, ...);
    - 0.0 in every float attribute of a layer whose name says it is a drop rate: how most transformers attention
      layers keep their rate (Llama, Mistral, Qwen, Gemma: `attention_dropout`, passed to the attention function
      whenever the layer is in train mode);
    - a layer that reads its rate from the model config at every forward (Falcon's decoder layer and attention,
      Persimmon's attention, GPT-Neo's flash-attention path) gets a `RatesOff` view of that config.
    The model's own config is left as it was, so an export saves the rates it was loaded with."""
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if is_drop_rate(name, value):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if (isinstance(config, PretrainedConfig) and not isinstance(module, PreTrainedModel)
                and any(is_drop_rate(k, v) for k, v in vars(config).items())
                and reads_rates_from_config(type(module))):  # elsewhere the view would only slow each read
            module.config = RatesOff(config)
    return model


def fused_activations(model: "torch.nn.Module") -> "torch.nn.Module":
    """Swap transformers' Python tanh-GELU (`gelu_new`: GPT-2's, five elementwise kernels forward and more backward)
    for PyTorch's fused kernel of the same formula (`nn.GELU(approximate="tanh")`, what transformers calls
    `gelu_pytorch_tanh`; outputs agree to float rounding, ~1e-7). In place; the saved config still says `gelu_new`,
    so an export loads anywhere as before."""
    import torch
    from transformers.activations import NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
    return model


def load_causal_lm(path: str, allow_download: bool = False, key: str = "model.path",
                   **kwargs: Any) -> "PreTrainedModel":
    """Load a causal LM with clear errors (not a causal LM, unreadable weights) that name `key`, the setting that
    gave the path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = resolve_model_path(path, allow_download, key)
    local = not allow_download or Path(ref).is_dir()
    readable = readable_saved_dir if Path(ref).is_dir() else fetched_from_hub  # a local folder, or a Hub id
    with readable(key, path):
        config = AutoConfig.from_pretrained(ref, local_files_only=local)
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures and not any(a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
        raise ConfigError(
            f"{key}={path!r} holds a {', '.join(architectures)}, not a causal LM; stages start from an "
            "AutoModelForCausalLM directory (a pretraining or SFT `model/` export)"
        )
    try:
        with readable(key, path, "model weights"):
            return fused_activations(AutoModelForCausalLM.from_pretrained(ref, local_files_only=local, **kwargs))
    except ValueError as err:
        raise ConfigError(
            f"{key}={path!r} holds a {type(config).__name__} that is not a causal LM ({err}); "
            "stages that generate need an AutoModelForCausalLM directory"
        ) from err


class CausalLMFactory(ModelSource):
    """Model plugin: `arch` + config keys build a fresh model; `path` loads a saved one instead.

    arch: a transformers `model_type` ("gpt2", "llama", ...). Every other keyword is a field of that config class
    (n_layer, hidden_size, ...) and is checked against it, so a typo fails instead of being silently ignored.
    """

    # set from the tokenizer, never by hand
    TOKENIZER_KEYS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")

    def __init__(self, path: str | None = None, allow_download: bool = False, arch: str = "gpt2", **config: Any):
        self.path = path
        self.allow_download = allow_download
        self.arch = arch
        self.config_kwargs = config
        if path:
            self.ref = resolve_model_path(path, allow_download)  # fail now, before any data is read
        else:
            self._check_keys()

    def _check_keys(self) -> None:
        from transformers import AutoConfig

        try:
            default = AutoConfig.for_model(self.arch)
        except ValueError as err:
            raise ConfigError(f"model.arch={self.arch!r} is not a transformers model type: {err}") from None
        fixed = [k for k in self.config_kwargs if k in self.TOKENIZER_KEYS]
        if fixed:
            raise ConfigError(f"model keys {fixed} are set from the tokenizer; remove them (change tokenizer.* instead)")
        known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
        unknown = [k for k in self.config_kwargs if k not in known]
        if unknown:
            hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
            raise ConfigError(
                f"model keys {unknown} are not fields of the {self.arch} config"
                + "".join(f"; {k}: did you mean {' or '.join(h)}?" for k, h in hints.items() if h)
            )

    def build(self, tokenizer: "PreTrainedTokenizerBase") -> "PreTrainedModel":
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.path:
            model = load_causal_lm(self.path, self.allow_download)
            if len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
            # from_pretrained returns eval mode, and Lightning keeps each module's mode at fit start: without this a
            # loaded model would fine-tune with its dropout silently off. Built from config or loaded, a model source
            # hands out a model in train mode; generation and evaluation switch to eval mode themselves.
            return model.train()
        try:
            config = AutoConfig.for_model(self.arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                          **self.config_kwargs)
            return fused_activations(AutoModelForCausalLM.from_config(config))
        except (ValueError, TypeError, AssertionError) as err:
            keys = ", ".join(f"{k}={v}" for k, v in self.config_kwargs.items())
            raise ConfigError(f"cannot build a {self.arch} model from model.* ({keys}): {err}") from None


def context_length(model: "PreTrainedModel") -> int | None:
    """The model's maximum sequence length, whatever the config calls it."""
    cfg = model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


def count_parameters(model: "PreTrainedModel") -> int:
    """Unique trainable parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            total += p.numel()
    return total


def positions(mask: "torch.Tensor") -> "torch.Tensor":
    """Position ids that count real tokens only (left padding), as generate() builds them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def layer_list(decoder: "torch.nn.Module", what: str, fix: str) -> str:
    """The name of a decoder's one list of layers (the child ModuleList as long as its config's num_hidden_layers:
    GPT-2's `h`, Llama's `layers`, ...); a ConfigError naming `what` and `fix` when there is not exactly one."""
    import torch

    total = int(getattr(decoder.config, "num_hidden_layers", 0) or 0)
    stacks = [name for name, child in decoder.named_children()
              if isinstance(child, torch.nn.ModuleList) and len(child) == total]
    if len(stacks) != 1:
        raise ConfigError(f"{what}: cannot find the layer list of this {type(decoder).__name__} (one ModuleList of "
                          f"{total} layers; found {stacks or 'none'}); {fix}")
    return stacks[0]


def bottom_layers(decoder: "PreTrainedModel", layers: Any, key: str = "algo.critic_layers") -> int:
    """`layers` as the number of a decoder's bottom layers to keep: a whole number from 1 to its layer count, or a
    ConfigError naming `key`."""
    total = int(getattr(decoder.config, "num_hidden_layers", 0) or 0)
    return checked_number(key, layers, whole=True, at_least=1, at_most=total,
                          note=f"the critic keeps some of the reward model's {total} layers; null: all of them")


def keep_bottom_layers(decoder: "PreTrainedModel", layers: int, key: str = "algo.critic_layers"
                       ) -> "PreTrainedModel":
    """Cut a decoder (a base model: embeddings, a list of layers, a final norm) to its bottom `layers` layers, in
    place: the layers above are dropped, the embeddings and final norm kept, and the config's layer count (and its
    per-layer kinds, where it has them) cut to match, so its last hidden state is the final norm of layer `layers`'s
    output. A probe forward checks that the decoder runs that many layers; a ConfigError naming `key` otherwise."""
    import torch

    total = int(getattr(decoder.config, "num_hidden_layers", 0) or 0)
    layers = bottom_layers(decoder, layers, key)
    stack = layer_list(decoder, f"{key}={layers}", f"use {key}=null (the whole transformer)")
    param = next(decoder.parameters())
    ids = torch.arange(6, device=param.device).remainder(int(getattr(decoder.config, "vocab_size", 0) or 1))[None]
    mask = torch.ones_like(ids)
    was_training = decoder.training
    decoder.eval()

    def probe():
        with torch.no_grad():
            return decoder(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                           output_hidden_states=True, **no_cache(decoder)).hidden_states

    try:
        whole = probe()
        setattr(decoder, stack, getattr(decoder, stack)[:layers])
        decoder.config.num_hidden_layers = layers
        if isinstance(getattr(decoder.config, "layer_types", None), list):
            decoder.config.layer_types = decoder.config.layer_types[:layers]
        hidden = probe()
        # the cut runs exactly its K layers, and they are the bottom ones: the states below the last are the whole
        # model's (the last may have the final norm applied)
        ran = "no hidden states" if hidden is None else f"{len(hidden) - 1} layers"
        if ran == f"{layers} layers" and not all(torch.allclose(a, b, atol=1e-5, rtol=1e-4)
                                                 for a, b in zip(hidden[:layers], whole[:layers])):
            ran = "other layers than its bottom ones"
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as e:
        ran = f"into an error ({type(e).__name__}: {e})"
    finally:
        decoder.train(was_training)
    if ran != f"{layers} layers":
        raise ConfigError(f"{key}={layers}: this {type(decoder).__name__}, cut to {layers} of its {total} layers, ran "
                          f"{ran} in a probe, so it cannot be cut that way; use {key}=null")
    return decoder


def value_branch(lm: "PreTrainedModel", layers: int, key: str = "algo.value_layers") -> "PreTrainedModel":
    """A value branch in the manner of trlX's `num_value_layers_unfrozen`: a decoder of `layers` layers that starts
    as a copy of the causal LM `lm`'s top `layers` layers and final norm, and reads the LM's hidden state below them
    (`inputs_embeds=hidden_states[-layers - 1]`, with the LM's attention mask and position ids). It has parameters of
    its own, trained by the value loss (whose gradient also reaches the LM's lower layers, as in trlX); a value
    layer on its last hidden state gives the values. At the start its last hidden state is the LM's.

    Built from the LM's config with `layers` layers and a one-row input embedding (never used: the branch is fed
    hidden states), in the dtype of the LM's top layer; its layers are deep copies of the LM's top ones, so each keeps
    what it was built with (its index, attention kind, window). Absolute position embeddings (GPT-2's `wpe`) are
    zeroed and frozen, since the hidden state it reads already holds them. A probe (two left-padded sequences of 16
    tokens) checks that the branch reproduces the LM's last hidden state, and a decoder that cannot be split this way
    (no single list of layers, weights the branch does not find, another output) is refused with a ConfigError
    naming `key`; the probe is short, so it would not see a difference that only longer sequences show."""
    import copy

    import torch

    total = int(getattr(lm.config, "num_hidden_layers", 0) or 0)
    layers = checked_number(key, layers, whole=True, at_least=1, at_most=total,
                            note=f"the value branch copies some of the policy's {total} layers; 0: a value layer on "
                                 "the last hidden state")
    decoder = lm.base_model
    stack = layer_list(decoder, f"{key}={layers}", f"use {key}=0")
    top = getattr(decoder, stack)[total - layers:]
    config = copy.deepcopy(decoder.config)
    config.num_hidden_layers, config.vocab_size, config.pad_token_id = layers, 1, None
    config.use_cache = False  # never decodes; a KV cache would be indexed by the copied layers' own indices
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer kinds (sliding window, ...): the top ones
        config.layer_types = config.layer_types[-layers:]
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: the caller's stream stays as it was
        branch = type(decoder)(config)
    param = next(top.parameters())
    branch.to(device=param.device, dtype=param.dtype)
    # the layers themselves, copied whole: each keeps what it was built with (its index, attention kind, window)
    setattr(branch, stack, copy.deepcopy(top))
    source, inputs = decoder.state_dict(), branch.get_input_embeddings()
    skip = {f"{name}.{p}" for name, m in branch.named_modules() if m is inputs for p, _ in m.named_parameters()}
    rest = [n for n in branch.state_dict() if n not in skip and not n.startswith(stack + ".")]
    missing = [n for n in rest if n not in source]
    if missing:
        raise ConfigError(f"{key}={layers}: the policy's {type(decoder).__name__} has no weights for the branch's "
                          f"{', '.join(missing[:3])}; this model cannot be split that way; use {key}=0")
    branch.load_state_dict({n: source[n] for n in rest}, strict=False)
    frozen = [m for m in branch.modules() if isinstance(m, torch.nn.Embedding)]  # the input and position tables
    for m in frozen:
        if m is not inputs:
            torch.nn.init.zeros_(m.weight)
        m.weight.requires_grad_(False)
    branch = disable_dropout(fused_activations(branch))
    _check_branch(lm, branch, layers, key)
    return branch


def _check_branch(lm: "PreTrainedModel", branch: "PreTrainedModel", layers: int, key: str) -> None:
    """The branch fed the LM's hidden state below its top `layers` layers reproduces the LM's last hidden state on a
    left-padded probe; a ConfigError otherwise."""
    import torch

    device = next(lm.parameters()).device
    ids = torch.randint(0, int(lm.config.vocab_size), (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    pos = positions(mask)
    was_training = lm.training, branch.training
    lm.eval(), branch.eval()
    try:
        with torch.no_grad():
            out = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                                **no_cache(lm.base_model))
            hidden = out.hidden_states
            got = None if len(hidden) != int(lm.config.num_hidden_layers) + 1 else branch(
                inputs_embeds=hidden[-layers - 1], attention_mask=mask, position_ids=pos,
                **no_cache(branch)).last_hidden_state
    finally:
        lm.train(was_training[0]), branch.train(was_training[1])
    want = out.last_hidden_state[mask.bool()]
    tolerance = 1e-4 if want.dtype == torch.float32 else 3e-2
    error = float("inf") if got is None else float((got[mask.bool()] - want).norm() / want.norm().clamp(min=1e-12))
    if not error <= tolerance:
        raise ConfigError(f"{key}={layers}: a branch of the top layers of this {type(lm).__name__} does not reproduce "
                          f"its last hidden state (relative error {error:.2g}), so this model cannot be split that "
                          f"way; use {key}=0 (a value layer on the last hidden state) or algo.critic=separate")
