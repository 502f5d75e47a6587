"""Dataset plugins: corpora, demonstrations, comparisons."""
