"""rlhf-lab core: CLI, stage runner, plugin contracts, tracking.

Kept import-light on purpose: `rlhf --help` must not pay for torch, Lightning, transformers or MLflow.
The core never imports `plugins/`; plugins arrive through Hydra `_target_`.
"""

__version__ = "0.1.0"


def _register_resolvers() -> None:
    """Config arithmetic the yaml files use, e.g. `max_new_tokens: ${add:${task.length},4}`,
    `rollouts_per_round: ${floordiv:${dataset.n},6}`."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("add", lambda *xs: sum(xs), replace=True)
    OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b), replace=True)


_register_resolvers()
