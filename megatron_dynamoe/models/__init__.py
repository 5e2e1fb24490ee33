"""Model definitions on Megatron-Core: architectures (presets, TransformerConfig), the GPTModel
builder and providers, norms."""
