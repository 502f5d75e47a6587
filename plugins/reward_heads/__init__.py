"""Reward heads: modules on the trunk's hidden states that give one reward per sequence (per ensemble member)."""
