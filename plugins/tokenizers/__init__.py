"""Tokenizer plugins: train one here, or load one from a path."""
