"""`python -m tests.kill_switch train ...`: the flashar-adapt CLI with a kill -9 installed at
one point of a training run (test only; the library has no such hook).

FLASHAR_TEST_KILL_AT_STEP=N: die after optimizer step N, before its checkpoint is considered.
FLASHAR_TEST_KILL_IN_SAVE=N: die while writing step N's checkpoint, with half its bytes in the
temp file (what a kill mid-write leaves). A step with no checkpoint runs on to the end."""
from __future__ import annotations

import io
import os
import signal
import sys

import torch

from flashar_adapt import cli, training

AT_STEP = "FLASHAR_TEST_KILL_AT_STEP"
IN_SAVE = "FLASHAR_TEST_KILL_IN_SAVE"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(at_step: int | None = None, in_save: int | None = None) -> None:
    save_if_due, save_checkpoint = training._save_if_due, training.save_checkpoint

    def save_if_due_or_die(acc, loss_mod, opt, sched, ckpt_path, recipe_name, cfg, step):
        if step == at_step:
            _die()
        save_if_due(acc, loss_mod, opt, sched, ckpt_path, recipe_name, cfg, step)

    def save_or_die(path, state):
        if state["global_step"] == in_save:
            buf = io.BytesIO()
            torch.save(state, buf)
            path.with_name(f".{path.name}.partial.tmp").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            _die()
        save_checkpoint(path, state)

    training._save_if_due, training.save_checkpoint = save_if_due_or_die, save_or_die


if __name__ == "__main__":
    install(*(int(os.environ[k]) if os.environ.get(k) else None for k in (AT_STEP, IN_SAVE)))
    sys.exit(cli.main())
