"""Baselines DynaMoE is compared with: the top-k MoE over the same shells (`topk`: router, model,
provider, evaluation variants) and its initial checkpoint from a DynaMoE one (`topk_init`)."""
