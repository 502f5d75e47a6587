"""Imitation algorithms: decide the training set of each SFT round (behaviour cloning, DAgger)."""
