"""Labellers: turn K responses to a prompt into a preference ranking."""
