"""The guides, run as written: every code block of README.md and docs/{api,training,
writing-a-recipe}.md is executed here (in a temporary folder, on tiny random models), so a
guide cannot drift from the code it documents.

How a block runs is said by an HTML comment right above it (invisible when rendered)::

    <!-- docs-test
    given gpt2 ./my-gpt2                 a tiny random model (or file) at the path the block uses
    replace GPT-B() => GPT-B(dim=32)     a text substitution; the left side must occur in the block
    write my-gpt2.yaml                   save the block to this file (a YAML block: merged with `with`)
    with {stage1: {steps: 2}}            YAML merged into the block before it is written
    run                                  python: exec; console: each `$ ` command, output compared
                                         (`...` matches anything, progress bars are
                                         ignored); bash: each line (`flashar-adapt ...`,
                                         `python -m MODULE ...`, `VAR=$(python -c "...")`
                                         and `$VAR` in later lines)
    not-run torchrun: reason             bash lines starting with this program are not run
    exit 2                               the exit status each console command must return
    skip: reason                         the block is not run (the reason is required)
    -->

Blocks of one guide share a folder and a Python namespace, in the order they appear, as a
reader following the guide would. Commands are `flashar-adapt ...`, run in-process.

The stand-ins (`given`): `gpt2 PATH` (a 4-layer GPT-2 save_pretrained folder),
`llamagen-checkpoint PATH KEY=VALUE... [--model-args]` (random weights of
`ModelArgs(KEY=VALUE...)` in the official `{"model": state_dict}` layout; `--model-args`
writes its sizes beside it, as an official size needs no file), `llamagen-vq PATH
codebook_size=K` (a small VQ-16), `image-folder DIR classes=C per-class=N size=S mode=L|RGB`
(random PNGs in class sub-folders), `class-batches NAME grid=H codebook=K classes=C` (`NAME`
= two batches of 4 random `(codes, labels)`), `fmnist-export PATH` (a copy of the shipped
Fashion-MNIST export), `fmnist-reference PATH N` (its first N test images as an ADM .npz and
their shards, `flashar_adapt.fmnist.reference`). `needs fashion-mnist`: the guide is skipped
where the dataset is not installed (it is wherever scripts/test.sh ran as root).
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import inspect
import io
import json
import os
import re
import runpy
import shlex
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import flashar_adapt as fa
from flashar_adapt import commands
from flashar_adapt.fmnist import ASSETS
from flashar_adapt.fmnist.reference import write_reference
from tests import tiny

ROOT = Path(__file__).resolve().parent.parent
GUIDES = [
    "README.md",
    "docs/api.md",
    "docs/training.md",
    "docs/writing-a-recipe.md",
    "docs/quickstart-real-model.md",
    "docs/fmnist.md",
]
CODE_LANGS = {"python", "bash", "sh", "console", "yaml", "toml"}


@dataclasses.dataclass
class Block:
    doc: str
    line: int
    lang: str
    text: str
    directives: list[str]

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks(doc: str) -> list[Block]:
    lines = (ROOT / doc).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\S*)\s*$", lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        out.append(Block(doc, i + 1, m.group(1), "\n".join(lines[i + 1 : j]) + "\n", _directives(lines, i)))
        i = j + 1
    return out


def _directives(lines: list[str], fence: int) -> list[str]:
    """The docs-test comment ending on the line right above the fence, one directive a line."""
    k = fence - 1
    if k < 0 or not lines[k].rstrip().endswith("-->"):
        return []
    start = k
    while start >= 0 and "<!--" not in lines[start]:
        start -= 1
    body = "\n".join(lines[start : k + 1]).strip()
    if start < 0 or not body.startswith("<!-- docs-test"):
        return []
    body = body.removeprefix("<!-- docs-test").removesuffix("-->").lstrip(":")
    return [d.strip() for d in body.splitlines() if d.strip()]


# ---------------------------------------------------------------- stand-ins for real weights


def _kv(args: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args)}


def _given(spec: str, ns: dict) -> None:
    kind, *args = shlex.split(spec)
    torch.manual_seed(0)
    if kind == "gpt2":  # a 4-layer GPT-2 save_pretrained folder (module names unlike Llama's)
        tiny.gpt2().save_pretrained(args[0], safe_serialization=True)
    elif kind == "llamagen-checkpoint":  # an official-layout {"model": state_dict} of ModelArgs(**k=v)
        from dataclasses import asdict

        from flashar_adapt.integrations.llamagen import ModelArgs, Transformer

        record = "--model-args" in args  # a small stand-in is no official size: it records its sizes
        kw = _kv([a for a in args[1:] if a != "--model-args"])
        torch.save({"model": Transformer(ModelArgs(**kw)).state_dict()}, args[0])
        if record:
            (Path(args[0]).parent / "model_args.json").write_text(json.dumps(asdict(ModelArgs(**kw))))
    elif kind == "llamagen-vq":  # PATH codebook_size=K: a small VQ-16 in the official {"model": ...} layout
        from flashar_adapt.integrations.llamagen import VQ_16

        kw = dict(ch=32, z_channels=32, codebook_embed_dim=8, num_res_blocks=1, **_kv(args[1:]))
        torch.save({"model": VQ_16(**kw).state_dict()}, args[0])
    elif kind == "image-folder":  # DIR classes=C per-class=N size=S mode=L|RGB: random PNGs, a class folder
        from PIL import Image

        kw = _kv(args[1:])
        g = torch.Generator().manual_seed(0)
        chans = 3 if kw.get("mode", "RGB") == "RGB" else 1
        for c in range(kw["classes"]):
            folder = Path(args[0]) / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(kw["per-class"]):
                x = torch.randint(0, 256, (kw["size"], kw["size"], chans), generator=g, dtype=torch.uint8)
                Image.fromarray(x.squeeze(-1).numpy() if chans == 1 else x.numpy()).save(folder / f"{k}.png")
    elif kind == "class-batches":  # NAME grid=H codebook=K classes=C: two batches of 4 (codes, labels)
        kw = {k: int(v) for k, v in (a.split("=", 1) for a in args[1:])}
        g = torch.Generator().manual_seed(0)
        ns[args[0]] = [
            (
                torch.randint(kw["codebook"], (4, kw["grid"], kw["grid"]), generator=g),
                torch.randint(kw["classes"], (4,), generator=g),
            )
            for _ in range(2)
        ]
    elif kind == "fmnist-export":  # PATH: a copy of the shipped Fashion-MNIST export
        shutil.copytree(ASSETS / "flashar", args[0])
    elif kind == "fmnist-reference":  # PATH N: the first N test images (test.npz) and their shards
        write_reference(args[0], int(args[1]))
    else:
        pytest.fail(f"unknown docs-test given {kind!r}")


# ---------------------------------------------------------------- running blocks


def _cli(argv: list[str]) -> tuple[int, str]:
    """Run ``flashar-adapt ...`` or ``python -m MODULE ...`` in-process; (exit status, output)."""
    env = {}
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        k, v = argv.pop(0).split("=", 1)
        env[k] = v
    module = argv[1:2] == ["-m"] and argv[0] == "python"
    assert argv and (argv[0] == "flashar-adapt" or module), f"only flashar-adapt and python -m run here, got {argv}"
    out = io.StringIO()
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                rc = _run_module(argv[2], argv[3:]) if module else commands.main(argv[1:])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    # progress bars (tqdm, transformers' weight loading) are not part of what a guide shows
    return rc, "\n".join(ln for ln in out.getvalue().splitlines() if not re.search(r"\d+%\|", ln)) + "\n"


def _run_module(name: str, args: list[str]) -> int:
    """``python -m name args`` as the shell would run it, in this process."""
    saved = sys.argv
    sys.argv = [name, *args]
    try:
        with warnings.catch_warnings():  # "found in sys.modules": a module the tests imported runs again as __main__
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(name, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = saved
    return 0


def _python_c(code: str) -> str:
    """What ``python -c code`` prints (the guide's `VAR=$(python -c "...")`), run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<python -c>", "exec"), {"__name__": "__main__"})  # noqa: S102 - the guide's own code
    return out.getvalue().strip()


def _run_console(b: Block, text: str, want_rc: int) -> None:
    cmds: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            cmds.append((line[2:], []))
        elif cmds:
            cmds[-1][1].append(line)
    assert cmds, f"{b.where}: a console block with no `$ ` command"
    checker = doctest.OutputChecker()
    for cmd, want in cmds:
        rc, got = _cli(shlex.split(cmd))
        assert rc == want_rc, f"{b.where}: `{cmd}` exited {rc}, the guide expects {want_rc}:\n{got}"
        want_text = "\n".join(want).strip() + "\n"
        if want_text.strip() and not checker.check_output(
            want_text, got, doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        ):
            pytest.fail(f"{b.where}: `{cmd}` printed\n{got}\nthe guide shows\n{want_text}")


def _run_bash(b: Block, text: str, not_run: set[str]) -> None:
    ran = 0
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():  # continuation lines joined, as the shell does
        cmd = re.sub(r"\s+#.*$", "", line).strip()
        if not cmd or cmd.startswith("#"):
            continue
        m = re.fullmatch(r"""([A-Z_][A-Z0-9_]*)=\$\(python -c "([^"]*)"\)""", cmd)
        if m:  # a shell variable from a Python one-liner, for the lines below
            os.environ[m.group(1)] = _python_c(m.group(2))
            ran += 1
            continue
        argv = [os.path.expandvars(a) for a in shlex.split(cmd)]
        if argv[0] in not_run:
            continue
        rc, got = _cli(argv)
        assert rc == 0, f"{b.where}: `{cmd}` exited {rc}:\n{got}"
        ran += 1
    assert ran, f"{b.where}: no command of this block ran"


def _merge(base, extra):
    if isinstance(base, dict) and isinstance(extra, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in extra.items()}}
    return extra


def run_block(b: Block, ns: dict) -> None:
    text, acted, want_rc, not_run, merge = b.text, False, 0, set(), None
    for d in b.directives:
        word, _, rest = d.partition(" ")
        if word == "given":
            _given(rest, ns)
        elif word == "replace":
            old, new = rest.split(" => ", 1)
            assert old in text, f"{b.where}: docs-test replace: {old!r} is not in the block"
            text = text.replace(old, new)
        elif word == "with":
            merge = yaml.safe_load(rest)
        elif word == "exit":
            want_rc = int(rest)
        elif word == "needs":
            assert rest == "fashion-mnist", f"{b.where}: unknown docs-test needs {rest!r}"
            from flashar_adapt.fmnist.data import dataset_files

            missing = [p for p in dataset_files() if not p.is_file()]
            if missing:
                pytest.skip(f"{b.where} needs Fashion-MNIST ({missing[0]} not found)")
        elif word == "not-run":
            prog, _, reason = rest.partition(":")
            assert reason.strip(), f"{b.where}: not-run needs a reason"
            not_run.add(prog.strip())
    for d in b.directives:
        word, _, rest = d.partition(" ")
        if word == "write":
            body = yaml.safe_dump(_merge(yaml.safe_load(text), merge), sort_keys=False) if merge else text
            Path(rest).write_text(body)
            acted = True
        elif word == "run":
            if b.lang == "python":
                exec(compile(text, b.where, "exec"), ns)  # noqa: S102 - the guide's own code
            elif b.lang == "console":
                _run_console(b, text, want_rc)
            elif b.lang in ("bash", "sh"):
                _run_bash(b, text, not_run)
            else:
                pytest.fail(f"{b.where}: cannot run a {b.lang} block (use write)")
            acted = True
    assert acted, f"{b.where}: docs-test comment without run, write or skip"


@pytest.fixture
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLASHAR_RECIPE_PATH", raising=False)
    env, threads = dict(os.environ), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine
    yield tmp_path
    os.environ.clear()
    os.environ.update(env)  # a guide may set variables the way a reader's shell would
    torch.set_num_threads(threads)


@pytest.mark.parametrize("doc", GUIDES)
def test_guide_runs_as_written(doc, _isolated):
    todo = [b for b in blocks(doc) if b.lang in CODE_LANGS]
    assert todo, f"{doc}: no code blocks found"
    unmarked = [b.where for b in todo if not b.directives]
    assert not unmarked, f"code blocks without a docs-test comment (run, write or skip: reason): {unmarked}"
    ns: dict = {"__name__": "__docs__"}
    for b in todo:
        if b.directives[0].startswith("skip"):
            assert b.directives[0].partition(":")[2].strip(), f"{b.where}: skip needs a reason"
            continue
        run_block(b, ns)


# ---------------------------------------------------------------- api.md signatures


def _split(arglist: str) -> list[str]:
    """Top-level comma-separated pieces (commas inside brackets or quotes do not split)."""
    parts, depth, cur, quote = [], 0, "", None
    for ch in arglist:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def _params(arglist: str) -> list[str] | None:
    """Parameter names of a documented signature, or None if it is a call, not a signature."""
    names = []
    for p in _split(arglist):
        if p in ("*", "") or p == "/":
            continue
        name = p.lstrip("*").split("=")[0].strip()
        if not name.isidentifier():
            return None
        names.append(name)
    return names


def _real(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters]


def _defaults(arglist: str) -> dict[str, str]:
    """Documented defaults (``name=value``) as source text."""
    return {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in _split(arglist) if "=" in p)}


def _check_defaults(name: str, fn, arglist: str) -> None:
    import ast

    params = inspect.signature(fn).parameters
    for key, text in _defaults(arglist).items():
        want = params[key].default
        assert want is not inspect.Parameter.empty, f"api.md gives fa.{name}'s {key} a default; the code has none"
        assert ast.literal_eval(text) == want, f"api.md: fa.{name}({key}={text}), the code's default is {want!r}"


def test_api_signatures():
    """Every `fa.name(...) -> ...` in api.md lists exactly the function's parameters, in order;
    the functions the issue found undocumented are there."""
    text = (ROOT / "docs/api.md").read_text()
    seen = set()
    for m in re.finditer(r"`fa\.(\w+)\(([^`]*)\)\s*->[^`]*`", text):
        name, names = m.group(1), _params(m.group(2))
        assert names is not None, f"api.md: cannot read the signature of fa.{name}: {m.group(0)}"
        assert names == _real(getattr(fa, name)), (
            f"api.md documents fa.{name}({', '.join(names)}), the code has {inspect.signature(getattr(fa, name))}"
        )
        _check_defaults(name, getattr(fa, name), m.group(2))
        seen.add(name)
    for name in (
        "score",
        "check",
        "train",
        "load_adapted",
        "inspect_model",
        "teacher_forward",
        "list_runners",
        "logits",
        "patch",
        "load_recipe",
        "list_recipes",
        "export_merged",
        "recipe_from_dict",
        "sample",
    ):
        assert name in seen, f"api.md has no `fa.{name}(...) -> ...` signature"
    gen = re.search(r"codes = model\.generate\((cond, \*[^)]*)\)", text, re.S)
    assert gen and _params(gen.group(1)) == _real(fa.generate)[1:], "api.md's model.generate signature is stale"
    _check_defaults("generate", fa.generate, " ".join(gen.group(1).split()))


def test_exports_a_user_looks_for():
    assert fa.TrainConfig.from_dict is not None and "TrainConfig" in fa.__all__
    assert set(fa.list_runners()) >= {"transformers", "llamagen"}


def test_config_reference_table_is_generated_from_the_class():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import config_reference
    finally:
        sys.path.pop(0)
    _, table, _ = config_reference.split((ROOT / "docs/training.md").read_text())
    assert table == config_reference.render(table), "run python scripts/config_reference.py"
    keys = [r.split("|")[1].strip().strip("`") for r in table[2:]]
    assert keys == [k for k, _ in config_reference.rows()]
    assert all(r.split("|")[3].strip() for r in table[2:]), "every config key needs a meaning"
    cells = dict(config_reference.rows())
    assert (
        cells["batch_size"],
        cells["stage2.steps"],
        cells["stage2.lora_lr_scale"],
        cells["stage1.min_lr_ratio"],
    ) == ("`8`", "`0`", "`1.0`", "`0.1`")


def test_tables_catch_a_drift(tmp_path):
    """The checks above can fail: a changed default and a stale signature are both caught."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import config_reference
    finally:
        sys.path.pop(0)
    _, table, _ = config_reference.split((ROOT / "docs/training.md").read_text())
    stale = [r.replace("| `8` |", "| `16` |") if r.startswith("| `batch_size`") else r for r in table]
    assert stale != table and config_reference.render(stale) != stale
    assert _params("model, cond, codes, mode") != _real(fa.score)
    with pytest.raises(AssertionError, match="default is 'two_way'"):
        _check_defaults("score", fa.score, 'model, cond, codes, mode="raster", cond_mask=None')
    assert _defaults('model, x=(1, 2), *, y="a,b", **kw') == {"x": "(1, 2)", "y": '"a,b"'}


def test_a_block_with_an_undefined_name_fails(tmp_path, monkeypatch):
    """The runner can fail: a Python block using a name no earlier block of its guide defined
    (the quickstart's `labels`, once) stops the guide's test."""
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__docs__"}
    run_block(Block("x.md", 1, "python", "import torch\n", ["run"]), ns)
    with pytest.raises(NameError, match="labels"):
        run_block(Block("x.md", 3, "python", "codes = torch.zeros(2)[labels]\n", ["run"]), ns)
    with pytest.raises(AssertionError, match="exited 2"):
        run_block(Block("x.md", 5, "bash", "flashar-adapt generate --out o --recipe nope\n", ["run"]), ns)
