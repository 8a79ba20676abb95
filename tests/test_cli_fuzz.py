"""The command line's boundary is total: for any argv a careless or hostile user can type, every
subcommand exits 0 or 2 (``check``: or 1, a check that ran and failed), never with a
traceback, and a refusal is one line on stderr that names an option or a value it was given.

The argv are generated from the parsers themselves (every option of every subcommand, so a
new option is fuzzed the day it is added), with values drawn by the option's type: numbers at
and past their edges, NaN and infinities, huge and malformed integers, devices this machine
does not have, and paths that are missing, empty, junk, non-UTF-8, named with glob
characters or duplicate-key YAML. No path holds a usable model, so nothing runs long; the
demo's long work is replaced by a recorder that checks what it was handed is in range.

The examples are fixed (``derandomize``) so CI runs the same ones every time; set
``FUZZ_EXAMPLES=500`` to explore further with fresh random examples.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashar_adapt import commands
from flashar_adapt.commands import types as T
from flashar_adapt.commands.report import printable

EXPLORE = int(os.environ.get("FUZZ_EXAMPLES", "0"))
SETTINGS = settings(
    max_examples=EXPLORE or 30,
    derandomize=not EXPLORE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)

INTS = ("-1", "0", "1", "2", "7", "4096", "2147483648", "4294967296", "9" * 30, "1e3", "0x10", "abc", "", " 3")
FLOATS = ("nan", "inf", "-inf", "-1", "0", "0.5", "1", "2", "1e400", "1e5", "x", "", "-0")
DEVICES = ("cpu", "cuda", "cuda:1", "mps", "meta", "tpu", "cpu:0", "", "x")
STRINGS = ("", "-", "a", "\udcff", "é", " ", "two_way", "raster", "linear", "constant", "zigzag", "inception")
SETS = ("n_head=4", "n_head=-1", "=", "x", "dim=abc", "a=[1,", "n_layer=0", "k=v=w")
RECIPES = ("fmnist-c2i", "llamagen-c2i-b", "no-such-recipe")
PATH_NAMES = ("missing", "empty_dir", "junk", "empty_file", "fake_export", "dup.yaml", "caf\udce9", "x[*]?", "imgs")

_INT_TYPES = {T.positive_int, T.non_negative_int, T.seed_int, T.class_id, T.tiny_grid, T.tiny_batch, int}
_FLOAT_TYPES = {T.non_negative_float, T.guidance_float, T.temperature_float, T.probability, float}


def _pool(root: Path) -> dict[str, str]:
    """Paths of every kind the fuzz hands to path options, made fresh for one example."""
    (root / "empty_dir").mkdir()
    (root / "junk").write_bytes(bytes(range(256)) * 3)
    (root / "empty_file").write_bytes(b"")
    (root / "fake_export").mkdir()
    (root / "fake_export" / "flashar_config.json").write_text('{"format": "flashar-adapt/1", "backbone": 3}')
    (root / "dup.yaml").write_text("model: {format: llamagen}\nrecipe: a\nrecipe: b\n")
    (root / "caf\udce9").mkdir()
    (root / "x[*]?").mkdir()
    for cls in ("shirt", "shoe"):  # a tiny image folder: tokenize may succeed on it
        (root / "imgs" / cls).mkdir(parents=True)
        (root / "imgs" / cls / "a.pgm").write_bytes(b"P5 28 28 255\n" + bytes(range(28)) * 28)
    return {name: str(root / name) for name in PATH_NAMES}


def _value(draw, action: argparse.Action, paths: dict[str, str]) -> str:
    t = action.type
    if action.choices is not None:
        return draw(st.sampled_from([*map(str, action.choices), *STRINGS]))
    if t in _INT_TYPES:
        return draw(st.sampled_from(INTS))
    if t in _FLOAT_TYPES:
        return draw(st.sampled_from(FLOATS))
    if t is T.device_name:
        return draw(st.sampled_from(DEVICES))
    if action.dest == "set":
        return draw(st.sampled_from(SETS))
    if action.dest in ("recipe", "prompt_template", "extractor", "cfg_schedule", "prompts", "negative_prompt"):
        return draw(st.sampled_from([*RECIPES, *STRINGS, *paths.values()]))
    return draw(st.sampled_from([*paths.values(), *STRINGS[:3]]))


def _values(draw, action: argparse.Action, paths: dict[str, str]) -> list[str]:
    n = action.nargs
    count = n if isinstance(n, int) else (draw(st.integers(1, 2)) if n in ("+", "*") else 1)
    return [_value(draw, action, paths) for _ in range(count)]


def _argv(draw, name: str, parser: argparse.ArgumentParser, paths: dict[str, str]) -> list[str]:
    argv = [name]
    for action in parser._actions:  # argparse has no public list of a parser's actions
        if isinstance(action, argparse._HelpAction) or action.dest in ("debug", "recipe_dir_after"):
            continue
        if not action.option_strings:  # a positional: usually given, sometimes left out
            if draw(st.integers(0, 5)):
                argv += _values(draw, action, paths)
            continue
        if not (action.required or draw(st.booleans())):
            continue
        opt = draw(st.sampled_from(action.option_strings))
        argv += [opt] if action.nargs == 0 else [opt, *_values(draw, action, paths)]
    if draw(st.integers(0, 6)) == 0:
        argv.append(draw(st.sampled_from(["--no-such-option", "-x", "extra"])))
    return argv


def _names(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """What a refusal may name: an option or positional of the command, or a value it was given."""
    out = {s for a in parser._actions for s in a.option_strings}
    out |= {a.dest for a in parser._actions if not a.option_strings}
    out |= {str(a.metavar) for a in parser._actions if isinstance(a.metavar, str)}
    given = {v for v in argv if v.strip()}
    return out | given | {printable(v) for v in given}  # a non-UTF-8 name is printed escaped


class _Recorded(Exception):
    pass


@pytest.fixture
def long_work_recorded(monkeypatch):
    """The demo's long runs replaced by a check of what they are handed."""

    def run(out, **kw):
        assert all(isinstance(v, int) and v >= 1 for k, v in kw.items() if k in ("samples", "nll_images", "repeat"))
        assert 0 <= kw["cfg_scale"] <= 1e4 and 1 <= kw["tiny_grid"] <= T.MAX_TINY_GRID
        return 0

    def tiny_demo(grid, batch):
        assert 1 <= grid <= T.MAX_TINY_GRID and 1 <= batch <= T.MAX_TINY_BATCH
        return 0

    monkeypatch.setattr(commands.demo, "run", run)
    monkeypatch.setattr(commands.demo, "tiny_demo", tiny_demo)


SUBCOMMANDS = commands.subcommands()


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
@SETTINGS
@given(data=st.data())
def test_any_argv_exits_0_or_2_with_one_line_naming_what_to_fix(name, data, capsys, long_work_recorded):
    parser = SUBCOMMANDS[name]
    with tempfile.TemporaryDirectory() as tmp:
        paths = _pool(Path(tmp))
        argv = _argv(data.draw, name, parser, paths)
        cwd = os.getcwd()
        os.chdir(tmp)  # outputs named by relative junk ("a", "-") land in the example's folder
        try:
            try:
                rc = commands.main(argv)
            except SystemExit as e:
                rc = e.code
        finally:
            os.chdir(cwd)
        err = capsys.readouterr().err
    allowed = (0, 1, 2) if name == "check" else (0, 2)
    assert rc in allowed, (argv, rc, err)
    assert "Traceback" not in err, (argv, err)
    if rc == 2:
        lines = [x for x in err.splitlines() if x.strip()]
        assert len(lines) == 1, (argv, err)
        assert any(w in lines[0] for w in _names(parser, argv)), (argv, lines[0])


def test_a_usage_error_is_one_line_naming_the_option(capsys):
    for argv, option in (
        (["generate", "--out", "o", "--seed", "4294967296"], "--seed"),
        (["generate", "--out", "o", "--cfg", "nan"], "--cfg"),
        (["sample", "--out", "o", "--device", "tpu"], "--device"),
        (["tokenize", "src", "--out", "o", "--batch-size", "0"], "--batch-size"),
        (["demo", "--tiny", "--grid", str(T.MAX_TINY_GRID + 1)], "--grid"),
    ):
        with pytest.raises(SystemExit) as e:
            commands.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and option in err, (argv, err)


def test_devices_this_machine_lacks_are_refused_before_loading():
    import torch

    with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        T.device_name("cuda")
    assert T.device_name("cpu") == "cpu"
    for bad in ("meta", "tpu", "", "cuda:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            T.device_name(bad)
