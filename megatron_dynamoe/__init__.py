"""megatron-dynamoe: dense LLM -> token-difficulty-routed Mixture-of-Experts on Megatron-Core."""

from megatron_dynamoe.runtime import deferred_compile as _deferred_compile

# Before anything imports Megatron-Core: its fusions compile at their first call, not at
# import (runtime/deferred_compile.py: 2-3 s off the start of every tool but training).
_deferred_compile.install()
