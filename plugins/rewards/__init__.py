"""Programmatic rewards (gold scorers): task golds, sentiment."""
