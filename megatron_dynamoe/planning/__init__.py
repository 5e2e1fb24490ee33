"""Layout planning: per-GPU memory of a parallel layout, and the layout search."""
