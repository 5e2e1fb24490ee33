#!/usr/bin/env python
"""`python tools/evaluate.py`: the Megatron-style spelling of the `dynamoe-evaluate` command.

The code is megatron_dynamoe/cli/evaluate.py; the package must be installed (`make install`)."""

from megatron_dynamoe.cli.evaluate import entry, main  # noqa: F401  (main: in-process runs)

if __name__ == "__main__":
    entry()
