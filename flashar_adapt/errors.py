"""The one base class of every error the toolkit raises on purpose.

Bad input (a recipe, a training config, a data folder, an export folder, generation
arguments) is reported with a subclass of ``FlashARError``; the command line turns any of
them into one line on stderr and exit code 2. Any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

from collections.abc import Iterator


class FlashARError(Exception):
    """Bad input or a bad file, reported in one sentence that names what to fix."""


class InputError(FlashARError, ValueError):
    """An argument or a path given to a function or a command is not usable."""


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from (``__cause__``, else ``__context__``), each once."""
    seen, e = set(), error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__
