"""Model formats: how one family's models are laid out in files, and how to read and write them.

A format is a class whose methods are class methods (it holds no state): ``sniff`` recognises
its files, ``load`` builds the model from a *spec* (a small JSON-able mapping naming the
files), ``save`` writes a model and returns its spec, ``owns`` tells a live model of the
family by its type. Formats are plugins (``flashar_adapt.plugins``): entry points of the
group ``flashar_adapt.formats``, or classes registered with ``@register_format("name")``.

A *model spec* names its format: ``{"format": "llamagen", "checkpoint": "base.pt", ...}``.
Training configs (``model:``) and export folders (``backbone`` in ``flashar_config.json``)
hold one. ``backend:`` is read as the old name of ``format:`` (the three shipped formats
carry the names the shipped backends had), so configs and exports written before the split
into runners and formats still load.
"""

from __future__ import annotations

import abc
import inspect
import json
import os
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .errors import FlashARError, error_chain
from .plugins import FORMATS, MissingDependency, Registry
from .validate import did_you_mean

REGISTRY = Registry(FORMATS, "model format")
# the key of a model spec that names its format; LEGACY_KEY is its name before formats existed
FORMAT_KEY, LEGACY_KEY = "format", "backend"


class FormatError(FlashARError, ValueError):
    """A model spec names no format, or one that is not installed."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how saved specs and configs name a dtype
    (``getattr(torch, name)`` reads it back)."""
    return str(dtype).removeprefix("torch.")


def register_format(name: str):
    """Class decorator: make a model format available as ``format: <name>``."""

    def deco(cls):
        if inspect.isabstract(cls):
            raise TypeError(
                f"model format {cls.__qualname__} does not implement {', '.join(sorted(cls.__abstractmethods__))}"
            )
        return REGISTRY.register(name, cls)

    return deco


def get_format(name: str) -> type[ModelFormat]:
    """The format called ``name``; FormatError naming the known ones if there is none."""
    try:
        cls = REGISTRY.get(name)
    except MissingDependency as e:
        raise FormatError(str(e)) from None
    if cls is None:
        known = list_formats()
        raise FormatError(f"unknown model format {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}")
    return cls


def list_formats() -> list[str]:
    """Names of every usable model format."""
    return REGISTRY.names()


def formats_in_order() -> list[type[ModelFormat]]:
    """Every usable format, in the order they are asked (``priority``, lowest first)."""
    found = {cls for cls in REGISTRY.items().values()}  # an alias names a class twice
    return sorted(found, key=lambda cls: (cls.priority, cls.name))


class ModelFormat(abc.ABC):
    """How one family's models are laid out in files. Never instantiated: every method is a
    class method."""

    name: ClassVar[str] = ""
    #: the runner (a recipe's ``backend:``) that runs models of this format; what ``inspect``
    #: drafts for a model it loaded from this format's files
    runner: ClassVar[str] = ""
    #: order in which formats are asked to recognise a file or own a model (lowest first):
    #: family-specific formats go before generic ones
    priority: ClassVar[int] = 0
    #: the keys a model spec of this format may hold (beside ``format``); a key outside them
    #: (a typo: ``dtyp``) is refused with "did you mean". None: not checked.
    spec_keys: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    @abc.abstractmethod
    def owns(cls, model: nn.Module) -> bool:
        """Whether ``model`` is of this family (by its type), so ``save`` can write it."""

    @classmethod
    @abc.abstractmethod
    def sniff(cls, path: Path) -> dict | None:
        """Recognise a model on disk from its files alone (no weights loaded): a spec for
        ``load`` (absolute paths), or None when ``path`` is not in this format's layout."""

    @classmethod
    @abc.abstractmethod
    def load(cls, spec: dict, root: str | os.PathLike | None = None, overrides: dict | None = None) -> nn.Module:
        """Build the model a spec describes, in eval mode: paths in ``spec`` are relative to
        ``root`` (or absolute); ``overrides`` are constructor values the files do not record.
        Local files only; weights never unpickled as code."""

    @classmethod
    @abc.abstractmethod
    def save(cls, model: nn.Module, out_dir: Path) -> dict:
        """Write the backbone of ``model`` (without the FlashAR modules, see
        ``patching.backbone_only``) into the existing folder ``out_dir``; return its spec,
        with paths relative to ``out_dir`` (name a dtype with :func:`dtype_name`)."""


def format_of(model: nn.Module) -> type[ModelFormat]:
    """The first format (by priority) that owns ``model``."""
    for cls in formats_in_order():
        if cls.owns(model):
            return cls
    raise FormatError(
        f"no model format owns a {type(model).__name__} (known: {', '.join(list_formats())}); "
        "register one with flashar_adapt.register_format"
    )


def save_model(model: nn.Module, out_dir: str | os.PathLike) -> dict:
    """Write ``model``'s backbone in its family's own layout; returns the model spec, which
    names the format."""
    cls = format_of(model)
    return {FORMAT_KEY: cls.name, **cls.save(model, Path(out_dir))}


def spec_format(spec: dict, legacy: str | None = None) -> tuple[type[ModelFormat], dict]:
    """(format, the rest of the spec) for a model spec: its ``format:``, else its old
    ``backend:``, else ``legacy`` (what an export written before formats recorded beside it)."""
    rest = dict(spec)
    name = rest.pop(FORMAT_KEY, None)
    old = rest.pop(LEGACY_KEY, None)
    name = name if name is not None else old if old is not None else legacy
    if not isinstance(name, str) or not name:
        raise FormatError(
            f"a model spec needs '{FORMAT_KEY}': the name of a model format ({', '.join(list_formats())}), got {name!r}"
        )
    cls = get_format(name)
    if cls.spec_keys is not None:
        unknown = sorted((k for k in rest if k not in cls.spec_keys), key=str)
        if unknown:
            raise FormatError(
                f"{unknown[0]!r} is not a key of a {name} model spec{did_you_mean(str(unknown[0]), cls.spec_keys)} "
                f"(it takes {', '.join(cls.spec_keys)})"
            )
    return cls, rest


def load_spec(spec: dict, root: str | os.PathLike | None = None, legacy: str | None = None) -> nn.Module:
    """The model a spec describes (see ``spec_format``), paths relative to ``root``."""
    cls, rest = spec_format(spec, legacy)
    return _loading(cls, root or ".", rest, root)


def _loading(cls, where, *args):
    """``cls.load(*args)``, with what a damaged or odd model file makes the libraries raise (a
    SafetensorError, a config validation error, an AttributeError on a config that is not a
    mapping) turned into a FormatError naming the files: bad input, not a bug here."""
    try:
        return cls.load(*args)
    except (FlashARError, OSError, ImportError, MemoryError, KeyboardInterrupt):  # already clear
        raise
    except Exception as e:  # noqa: BLE001 - every library raises its own types for a damaged file
        bad = _unreadable_json(where) if _decode_error(e) else None
        what = f"{bad[0]} is not UTF-8 JSON ({bad[1]})" if bad else f"{type(e).__name__}: {' '.join(str(e).split())}"
        raise FormatError(f"{where}: the {cls.name} format cannot load it ({what[:300]})") from e


def _decode_error(e: BaseException) -> bool:
    """``e``, or an error it was raised from, is a JSON or UTF-8 decode error."""
    return any(isinstance(x, (json.JSONDecodeError, UnicodeDecodeError)) for x in error_chain(e))


def _unreadable_json(where) -> tuple[str, str] | None:
    """The first ``*.json`` file of the folder ``where`` that does not parse as UTF-8 JSON,
    and why: the libraries' decode errors name a line and column, not the file."""
    folder = Path(where)
    if not folder.is_dir():
        return None
    for p in sorted(folder.glob("*.json")):
        try:
            json.loads(p.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            return p.name, " ".join(str(e).split())[:200]
    return None


def open_path(path: str | os.PathLike, overrides: dict | None = None) -> tuple[nn.Module, type[ModelFormat]]:
    """Load a model from a folder or file with the first format that recognises it (asked in
    ``priority`` order, from the files alone). Returns (model in eval mode, its format)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    for cls in formats_in_order():
        spec = cls.sniff(path)
        if spec is not None:
            return _loading(cls, path, spec, None, overrides or {}), cls
    hint = " (a flashar-adapt export: load it with fa.load_adapted)" if (path / "flashar_config.json").is_file() else ""
    raise FormatError(f"{path}: no model format recognises it (known: {', '.join(list_formats())}){hint}")
