"""Checkpoints: Megatron torch_dist (atomic, checksummed), integrity checks, Hugging Face interop."""
