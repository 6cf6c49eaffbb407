"""Preemption: SIGTERM / SIGINT end the run with a checkpoint at the current step instead of losing it.

A cluster's preemption notice is a SIGTERM, followed after a grace period by SIGKILL. Before the
training loop starts there is nothing to save, so a signal exits at once (through SystemExit, so the
output-directory lock is released). Once `arm()`ed, a signal only sets a flag; at the next step
boundary all ranks agree on it (`requested`, one all-reduce: a signal that reached any rank stops
all of them at the same step), the trainer saves `checkpoint-<step>`, prints one line and exits with
128 + the signal number (143 for SIGTERM, 130 for SIGINT), the shell's convention for "terminated by
a signal", so schedulers see the run as interrupted rather than finished. A second Ctrl-C quits at
once without saving.
"""

from __future__ import annotations

import os
import signal

import torch

from utils.errors import is_first_process

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
        self._previous = {}

    def install(self) -> Preemption:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def arm(self) -> None:
        """From now on a signal stops the run at the next step boundary, with a checkpoint."""
        self.armed = True

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            if is_first_process():
                _say(f"{name} before training started; exiting (nothing to save)")
            raise SystemExit(exit_code(signum))
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: quit now, without the checkpoint
        if self.signum is None and is_first_process():
            _say(f"{name} received; saving a checkpoint at the end of this step"
                 + (" (Ctrl-C again quits without saving)" if signum == signal.SIGINT else ""))
        self.signum = self.signum or signum

    def requested(self, accelerator) -> int | None:
        """The signal that any rank received (agreed by all ranks), or None."""
        mine = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        agreed = int(accelerator.reduce(mine, reduction="max").item())
        return agreed or None
