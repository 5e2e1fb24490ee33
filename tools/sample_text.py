#!/usr/bin/env python
"""`python tools/sample_text.py`: the Megatron-style spelling of the `dynamoe-sample-text`
command.

The code is megatron_dynamoe/cli/sample_text.py; the package must be installed (`make install`)."""

from megatron_dynamoe.cli.sample_text import entry, main  # noqa: F401  (main: in-process runs)

if __name__ == "__main__":
    entry()
