#!/usr/bin/env python
"""`python tools/moefy.py`: the Megatron-style spelling of the `dynamoe-moefy` command.

The code is megatron_dynamoe/cli/moefy.py; the package must be installed (`make install`)."""

from megatron_dynamoe.cli.moefy import entry, main  # noqa: F401  (main: in-process runs)

if __name__ == "__main__":
    entry()
