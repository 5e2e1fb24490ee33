"""Data: Megatron indexed datasets and blends, the shipped corpora, curriculum orders."""
