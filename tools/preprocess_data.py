#!/usr/bin/env python
"""`python tools/preprocess_data.py`: the Megatron-style spelling of the `dynamoe-preprocess` command.

The code is megatron_dynamoe/cli/preprocess_data.py; the package must be installed (`make install`)."""

from megatron_dynamoe.cli.preprocess_data import entry, main  # noqa: F401  (main: in-process runs)

if __name__ == "__main__":
    entry()
