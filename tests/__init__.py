"""The test suite; a package so helpers import as `tests.tiny`, `tests.numerics`, ... with no sys.path edits."""
