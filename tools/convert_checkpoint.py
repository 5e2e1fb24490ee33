#!/usr/bin/env python
"""`python tools/convert_checkpoint.py`: the Megatron-style spelling of the `dynamoe-convert` command.

The code is megatron_dynamoe/cli/convert_checkpoint.py; the package must be installed (`make install`)."""

from megatron_dynamoe.cli.convert_checkpoint import (  # noqa: F401  (main: in-process runs)
    entry,
    main,
)

if __name__ == "__main__":
    entry()
