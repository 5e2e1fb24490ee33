"""The data layer's one error type, importable by every data module without a cycle."""

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad data input (missing or corrupt files, bad blend / split / sizes): one clear line."""
