"""Concrete, swappable implementations of the contracts in framework/interfaces.py, picked by Hydra `_target_`."""
