"""How a command reports an error: one line on stderr."""

from __future__ import annotations

# Optional dependencies (import name -> the pip extra that installs it): a command that needs
# a missing one says so in one line instead of a traceback.
OPTIONAL_DEPENDENCIES = {"accelerate": "train", "peft": "train", "transformers": "hf", "matplotlib": "plots"}


def printable(text: str) -> str:
    """``text`` with characters stderr cannot encode (a non-UTF-8 file name's surrogate
    escapes, as Python reads it from argv) written as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(e: BaseException) -> str:
    return printable(" ".join(str(e).split()) or type(e).__name__)


def missing_dependency(e: ModuleNotFoundError, command: str) -> str | None:
    """The one line for ``command`` failing on an optional dependency that is not installed;
    None when ``e`` is about anything else (a bug keeps its traceback)."""
    top = (e.name or "").split(".")[0]
    extra = OPTIONAL_DEPENDENCIES.get(top)
    if extra is None:
        return None
    return f"flashar-adapt {command} needs {top}, which is not installed: pip install 'flashar-adapt[{extra}]'"
