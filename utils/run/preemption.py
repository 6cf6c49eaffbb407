"""Preemption: SIGTERM / SIGINT end the run with a checkpoint at the current step instead of losing it.

A cluster's preemption notice is a SIGTERM, followed after a grace period by SIGKILL. Before the
training loop starts there is nothing to save, so a signal exits at once (through SystemExit, so the
output-directory lock is released). Once `arm()`ed, a signal only sets a flag; at the next step
boundary all ranks agree on it (`requested`, one all-reduce: a signal that reached any rank stops
all of them at the same step), the trainer saves `checkpoint-<step>`, prints one line and exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT), the shell's convention for "terminated by
a signal", so schedulers see the run as interrupted rather than finished. A second Ctrl-C quits at
once without saving.

Under `accelerate launch` with one process, the trainer is the child of accelerate's launcher, and what a
scheduler or shell sees is the launcher's exit (accelerate/commands/launch.py, `simple_launcher`): it waits
for the trainer and turns any non-zero exit into a `CalledProcessError` traceback and exit code 1; it
forwards no signal, and a SIGTERM sent to it alone ends it at once, leaving the trainer running. So, on
Linux, when the parent is accelerate's single-process launcher: the trainer asks the kernel for a SIGTERM
when the launcher dies (PR_SET_PDEATHSIG; the trainer then checkpoints as for any SIGTERM), and a run that
stopped for a SIGTERM ends, after its checkpoint and after releasing the output directory, by ending the
launcher with SIGTERM: no traceback, and the scheduler sees 143 ("terminated"). A Ctrl-C in a terminal
reaches the launcher too, which would print a KeyboardInterrupt traceback 0.25 s later, so on SIGINT the
launcher is ended at once (the shell sees 143, the prompt returns) and the trainer finishes its step and
checkpoint on its own, saying so. The multi-process launchers (torchrun, and `accelerate launch` with
several processes, which runs torchrun's agent) forward signals to every worker and report a stopped
worker themselves (exit code 1); they are left alone.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from typing import NoReturn

import torch

from utils.errors import is_first_process
from utils.launchers import accelerate_launcher_pid
from utils.launchers import signal_me_when_parent_dies as _signal_me_when_parent_dies

HANDLED = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    return 128 + signum


def _say(message: str) -> None:
    # os.write, not print: a handler may interrupt a print in progress, and a buffered stream
    # refuses re-entrant writes.
    os.write(2, f"train_draftplus.py: {message}\n".encode())


class Preemption:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False
        self.launcher: int | None = None  # accelerate's single-process launcher, when it is the parent
        self.stopped = False
        self._previous = {}

    def install(self) -> Preemption:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        launcher = accelerate_launcher_pid()
        if launcher is not None and _signal_me_when_parent_dies(signal.SIGTERM) and os.getppid() == launcher:
            self.launcher = launcher
            # registered first, so it runs last at exit: after the output directory's lock is released
            atexit.register(self._end_launcher)
        return self

    def exit(self, signum: int) -> NoReturn:
        """End a run stopped by `signum` (its checkpoint saved): exit code 128 + signum, and under
        accelerate's single-process launcher the launcher's end without a traceback (see above)."""
        self.stopped = True
        raise SystemExit(exit_code(signum))

    def _end_launcher(self, now: bool = False) -> bool:
        """End accelerate's launcher (it waits for us, with SIGTERM's default action: it ends, 143) when
        this run stopped for a signal (or `now`); False if there is none to end."""
        launcher, self.launcher = self.launcher, None
        if launcher is None or not (self.stopped or now) or os.getppid() != launcher:
            return False  # not stopped by a signal, or the launcher is gone already
        _signal_me_when_parent_dies(0)  # we end it: no SIGTERM back
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.kill(launcher, signal.SIGTERM)
        return True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def arm(self) -> None:
        """From now on a signal stops the run at the next step boundary, with a checkpoint (and the run
        is not on its way out: a signal caught before, whose SystemExit was handled, is forgotten)."""
        self.armed, self.stopped = True, False

    def _handle(self, signum: int, frame) -> None:
        if self.stopped:
            return  # on the way out already (e.g. the launcher's death signal after our own)
        name = signal.Signals(signum).name
        # A Ctrl-C reached accelerate's launcher too: end it before it prints its traceback.
        returned = signum == signal.SIGINT and self._end_launcher(now=True)
        if not self.armed:
            if is_first_process():
                _say(f"{name} before training started; exiting (nothing to save)")
            self.stopped = True
            raise SystemExit(exit_code(signum))
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: quit now, without the checkpoint
        if self.signum is None and is_first_process():
            _say(f"{name} received; saving a checkpoint at the end of this step"
                 + (" (accelerate's launcher has returned; this process ends by itself once it is saved)"
                    if returned else " (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""))
        self.signum = self.signum or signum

    def requested(self, accelerator) -> int | None:
        """The signal that any rank received (agreed by all ranks), or None."""
        mine = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        agreed = int(accelerator.reduce(mine, reduction="max").item())
        return agreed or None
