"""rlhf-lab core: CLI, stage runner, plugin contracts, tracking.

Kept import-light on purpose: `rlhf --help` must not pay for torch, Lightning, transformers or MLflow.
The core never imports `plugins/`; plugins arrive through Hydra `_target_`.
"""

__version__ = "0.1.0"
