"""Small helpers every layer uses: errors, progress logging, numeric parity."""
