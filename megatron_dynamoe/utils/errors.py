"""Errors of bad input or environment that every layer may raise: the command-line layer
prints them as one `error:` line with exit code 2."""

from __future__ import annotations


class ToolError(Exception):
    """Bad input or environment: reported as one line, exit code 2."""
