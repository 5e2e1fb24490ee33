"""Command-line layer: one module per tool plus what the tools share. Nothing in the library
imports it."""
