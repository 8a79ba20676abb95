"""YAML from files the toolkit did not write (recipes, training configs): plain data only,
bounded in size, no aliases that expand, no duplicate keys."""

from __future__ import annotations

import re
from typing import Any

import yaml

from .sections import RecipeError

MAX_YAML_BYTES = 1 << 20


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (same constructors: plain data only) that refuses an alias
    to a mapping or a list, since a few such aliases expand a 1 KB file into gigabytes
    ("billion laughs"), and reads ``5e-5`` as a number, as YAML 1.2 does (YAML 1.1 needs a dot)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            node = self.anchors.get(ev.anchor)
            if node is not None and not isinstance(node, yaml.ScalarNode):
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"alias *{ev.anchor} repeats a mapping or list; "
                    "aliases that expand are refused (write the value out)",
                    ev.start_mark,
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of two equal keys: a second `stage2:` block would silently
        # replace the first. (Keys that compare equal across types, 1 and 1.0, collide too.)
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the constructor reports it
                    continue
                if first is not None:
                    raise DuplicateKey(key, key_node.start_mark.line + 1, first)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    """A mapping gives one key twice (``line`` and ``first`` count from 1)."""

    def __init__(self, key, line: int, first: int):
        self.key, self.line, self.first = key, line, first
        super().__init__(f"key {key!r} is given twice (line {line}, first at line {first}); keep one")


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
# Numbers as YAML 1.2 reads them (PyYAML follows YAML 1.1, where `010` is 8, `1:30` is 90 and
# `5e-5` is a string): decimal integers (leading zeros too), 0o/0x integers, and floats with a
# dot or an exponent; anything else stays a string, which the rules then refuse by name.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0o[0-7]+|0x[0-9a-fA-F]+|[0-9]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+|[0-9]*\.[0-9]+[eE][-+]?[0-9]+)"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    try:
        if body[:2] in ("0o", "0x"):
            return sign * int(body[2:], 8 if body[1] == "o" else 16)
        return sign * int(body, 10)
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


_Loader.add_constructor(_INT, _construct_int)


def safe_yaml(data: bytes | str, source: str | None = None) -> Any:
    """Parse YAML text from a file we did not write: UTF-8, at most MAX_YAML_BYTES, plain data
    only (as ``yaml.safe_load``), no aliases that expand, no key given twice in one mapping.
    Errors are a RecipeError (key ``<yaml>``, or the key given twice)."""
    if isinstance(data, bytes):
        if len(data) > MAX_YAML_BYTES:
            raise RecipeError("<yaml>", f"file is {len(data)} bytes; more than {MAX_YAML_BYTES} is refused", source)
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError(
                "<yaml>", f"is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})", source
            ) from None
    try:
        loader = _Loader(data)  # the reader refuses control characters (a NUL byte) right here
    except yaml.YAMLError as e:
        raise RecipeError("<yaml>", "not valid YAML: " + " ".join(str(e).split()), source) from None
    try:
        return loader.get_single_data()
    except DuplicateKey as e:
        raise RecipeError(str(e.key), str(e), source) from None
    except yaml.YAMLError as e:
        raise RecipeError("<yaml>", "not valid YAML: " + " ".join(str(e).split()), source) from None
    finally:
        loader.dispose()
