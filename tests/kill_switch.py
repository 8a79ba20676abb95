"""`python -m tests.kill_switch train ...`: the flashar-adapt CLI with a kill -9 installed at
one point of a training run (test only; the library has no such hook).

FLASHAR_TEST_KILL_AT_STEP=N: die after optimizer step N, before its checkpoint is considered.
FLASHAR_TEST_KILL_IN_SAVE=N: die while writing step N's checkpoint, with half its bytes in the
temp file, before the rename (what a kill mid-write leaves). A step with no checkpoint runs on to the end."""

from __future__ import annotations

import os
import signal
import sys

from flashar_adapt import commands, files
from flashar_adapt.training import checkpoints, loop

AT_STEP = "FLASHAR_TEST_KILL_AT_STEP"
IN_SAVE = "FLASHAR_TEST_KILL_IN_SAVE"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(at_step: int | None = None, in_save: int | None = None) -> None:
    # the loop calls save_if_due through its own module, save_if_due calls save_checkpoint through checkpoints'
    save_if_due, save_checkpoint = loop.save_if_due, checkpoints.save_checkpoint

    def save_if_due_or_die(acc, loss_mod, opt, sched, ckpt_path, recipe, cfg, step, inputs=None):
        if step == at_step:
            _die()
        save_if_due(acc, loss_mod, opt, sched, ckpt_path, recipe, cfg, step, inputs)

    def save_or_die(path, state):
        if state["global_step"] == in_save:

            def half_then_die(tmp, dst):  # the atomic write's own temp file, cut short, stays behind
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                _die()

            files.os.replace = half_then_die  # the process dies in this very call
        save_checkpoint(path, state)

    loop.save_if_due, checkpoints.save_checkpoint = save_if_due_or_die, save_or_die


if __name__ == "__main__":
    install(*(int(os.environ[k]) if os.environ.get(k) else None for k in (AT_STEP, IN_SAVE)))
    sys.exit(commands.main())


def kill_tokenize_mid_run(argv: list[str], state_file, done: int, slow: str) -> None:
    """Run ``flashar-adapt tokenize *argv`` in a child whose ``slow`` function ("module.name")
    sleeps 0.3 s a call, and SIGKILL it once ``state_file`` records ``done`` finished shards,
    so the kill lands between shards of a run that is still going."""
    import json
    import subprocess
    import time
    from pathlib import Path

    module, name = slow.rsplit(".", 1)
    code = (
        f"import sys, time; import {module} as m; f = m.{name}; "
        f"m.{name} = lambda *a, **k: (time.sleep(0.3), f(*a, **k))[1]; "
        "from flashar_adapt.commands import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "tokenize", *argv],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if Path(state_file).is_file() and json.loads(Path(state_file).read_text())["done"] >= done:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the child finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


def kill_cli_when(argv: list[str], ready, slow: str, timeout: float = 120) -> None:
    """Run ``flashar-adapt *argv`` in a child whose ``slow`` function ("module.name") sleeps
    0.3 s a call, and SIGKILL it as soon as ``ready()`` (polled) is true."""
    import subprocess
    import time
    from pathlib import Path

    module, name = slow.rsplit(".", 1)
    code = (
        f"import sys, time; import {module} as m; f = m.{name}; "
        f"m.{name} = lambda *a, **k: (time.sleep(0.3), f(*a, **k))[1]; "
        "from flashar_adapt.commands import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, "the child finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
