"""Baselines: the top-k MoE built from a DynaMoE checkpoint and its training entry."""
