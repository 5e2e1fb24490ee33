"""Upstream start-up noise, filtered once per process by the command-line entry points.

megatron-core 0.16.1 warns four times on import that Transformer Engine and Apex are not
installed, on every tool start. Which layer implementation runs is decided by
`--transformer-impl` (never by what happens to import) and logged by every tool, so these
warnings carry no information for our users. Warnings raised by megatron_dynamoe itself, and
every other upstream warning, stay visible.
"""

from __future__ import annotations

import warnings

_MESSAGES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
)


def filter_upstream_warnings() -> None:
    """Ignore the upstream 'not installed' warnings (call before megatron.core is imported)."""
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
