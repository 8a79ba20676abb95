"""The toolkit's version, recorded in what it writes (export configs)."""

__version__ = "0.1.0"
