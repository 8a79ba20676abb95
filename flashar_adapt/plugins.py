"""Plugins: runners, model formats, tokenizer kinds and feature extractors, found by name.

Each kind has one :class:`Registry`. Installed packages (this one included) declare their
plugins as entry points in their metadata, e.g. in ``pyproject.toml``::

    [project.entry-points."flashar_adapt.runners"]
    llamagen = "flashar_adapt.integrations.llamagen.runner:LlamaGenRunner"

and code registers its own in-process with the kind's decorator (``register_runner``,
``register_format``, ``register_tokenizer``). An entry point is imported when its name is
first asked for, or when the registry is listed. The core never imports a plugin by name.

A plugin whose module needs a package that is not installed (an optional dependency such as
transformers) is hidden: listing leaves it out with a one-line warning naming the package,
and asking for it by name raises :class:`MissingDependency`. Any other failure to import a
plugin is raised as it is: a broken plugin must never pass for a missing one.
"""

from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import FlashARError

RUNNERS = "flashar_adapt.runners"
FORMATS = "flashar_adapt.formats"
TOKENIZERS = "flashar_adapt.tokenizers"
EXTRACTORS = "flashar_adapt.extractors"


class MissingDependency(FlashARError, ImportError):
    """A plugin needs a package that is not installed."""


class PluginHidden(UserWarning):
    """Listing a registry left out a plugin whose optional dependency is not installed."""


def missing_package(err: ImportError, plugin_module: str) -> str | None:
    """The top-level package whose absence ``err`` reports, when it is a third-party one (not
    the plugin's own package, not flashar_adapt): then the plugin is optional, not broken."""
    name = getattr(err, "name", None)
    if not isinstance(err, ModuleNotFoundError) or not name:
        return None
    top = name.split(".")[0]
    if top in (plugin_module.split(".")[0], __name__.split(".")[0]):
        return None
    return top


class Registry:
    """Named plugins of one kind: in-process registrations and the entry points of ``group``.

    ``what`` names the kind in messages ("runner", "model format", "tokenizer kind"). A class
    registered here gets its registry name as its ``name`` attribute unless its own body
    declares one; an entry point whose name differs from the class's declared ``name`` is an
    alias of it (an old name kept so that files written with it still load)."""

    def __init__(self, group: str, what: str):
        self.group, self.what = group, what
        self._loaded: dict[str, Any] = {}
        self._points: dict[str, EntryPoint] | None = None
        self.hidden: dict[str, str] = {}  # name -> the missing package
        self._warned: set[str] = set()

    def entry_points(self) -> dict[str, EntryPoint]:
        """This group's entry points by name (read once per process)."""
        if self._points is None:
            points: dict[str, EntryPoint] = {}
            for ep in entry_points(group=self.group):
                old = points.get(ep.name)
                if old is not None and old.value != ep.value:
                    raise FlashARError(
                        f"two installed packages declare the {self.what} {ep.name!r} "
                        f"({old.value} and {ep.value}); uninstall one of them"
                    )
                points[ep.name] = ep
            self._points = points
        return self._points

    def register(self, name: str, obj: Any) -> Any:
        """Make ``obj`` available as ``name``; another object under a taken name is an error,
        the same one again (a module reloaded) replaces itself."""
        old = self.get(name, hidden_ok=True)
        if old is not None and _qualname(old) != _qualname(obj):
            raise ValueError(
                f"{self.what} name {name!r} is already taken by {_qualname(old)}; "
                f"register {getattr(obj, '__qualname__', obj)!r} under another name"
            )
        _name(obj, name)
        self._loaded[name] = obj
        self.hidden.pop(name, None)  # registered here: no longer the entry point that could not load
        return obj

    def get(self, name: str, hidden_ok: bool = False) -> Any | None:
        """The plugin called ``name``, or None when there is none. One whose optional
        dependency is missing raises MissingDependency (None with ``hidden_ok``)."""
        if name in self._loaded:
            return self._loaded[name]
        ep = self.entry_points().get(name)
        if ep is None:
            return None
        if name not in self.hidden:
            self._load(name, ep)
        if name in self.hidden:
            if hidden_ok:
                return None
            raise MissingDependency(
                f"the {self.what} {name!r} ({ep.value}) needs the package {self.hidden[name]!r}, which is not installed"
            )
        return self._loaded[name]

    def _load(self, name: str, ep: EntryPoint) -> None:
        try:
            obj = ep.load()
        except ImportError as e:
            package = missing_package(e, ep.module)
            if package is None:
                raise
            self.hidden[name] = package
            return
        _name(obj, name)
        self._loaded[name] = obj

    def items(self) -> dict[str, Any]:
        """Every usable plugin by name (entry points loaded now); a hidden one is left out
        with a one-line warning naming the package it needs."""
        for name in self.entry_points():
            self.get(name, hidden_ok=True)
        for name, package in self.hidden.items():
            if name not in self._warned:
                self._warned.add(name)
                warnings.warn(
                    f"{self.what} {name!r} is unavailable: it needs the package {package!r}, which is not installed",
                    PluginHidden,
                    stacklevel=3,
                )
        return dict(sorted(self._loaded.items()))

    def names(self) -> list[str]:
        """Names of the usable plugins, aliases left out (see the class docstring)."""
        return [n for n, obj in self.items().items() if getattr(obj, "name", n) == n]


def _name(obj: Any, name: str) -> None:
    """A class whose own body declares no ``name`` is called by its registry name."""
    if isinstance(obj, type) and "name" not in vars(obj):
        obj.name = name


def _qualname(obj: Any) -> tuple[str, str]:
    return getattr(obj, "__module__", ""), getattr(obj, "__qualname__", repr(obj))
