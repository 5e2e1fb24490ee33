"""Errors of bad input or environment that every layer may raise: the command-line layer
prints them as one `error:` line with exit code 2."""

from __future__ import annotations

# The exit codes of every command (the command-line layer prints the error line).
EXIT_BAD_INPUT = 2
EXIT_PARITY = 3
EXIT_DIVERGED = 4  # training met a non-finite loss or gradient and stopped
EXIT_COLLECTIVE_TIMEOUT = 5  # a collective outlived --distributed-timeout-minutes


class ToolError(Exception):
    """Bad input or environment: reported as one line, exit code 2."""
