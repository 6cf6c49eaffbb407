"""The launcher this process runs under, and ending it without its traceback.

What a shell sees of `accelerate launch` or `torchrun` is the launcher's exit, not the trainer's. accelerate's
single-process launcher (accelerate/commands/launch.py, `simple_launcher`) turns any non-zero exit of the trainer
into a `CalledProcessError` traceback and exit code 1 (only its `--quiet` flag spares it); torchrun's agent (also
inside `accelerate launch` with several processes) reports a failed worker with a `ChildFailedError` traceback.
Only a trainer that exits 0 avoids them, which would hide the failure. So a trainer that refuses its input ends
its launcher itself, after its own one line: accelerate's with SIGTERM (its default action: no traceback, exit
143), torchrun's agent, which handles SIGTERM with a traceback of its own, with SIGKILL (exit 137). Only for
refusals that every worker makes alike (its command line): a worker left running without its agent would wait
for the others forever. Stdlib only: imported before the slow imports, whose Ctrl-C it also handles.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

# How accelerate's launcher appears in its process's command line (`accelerate launch`, `accelerate-launch`,
# `python -m accelerate.commands.launch`).
_ACCELERATE_LAUNCH = ((b"accelerate", b"launch"), (b"accelerate-launch",), (b"-m", b"accelerate.commands.launch"))
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_AGENT_WAIT_S = 30.0  # how long a worker other than the local first waits for the agent's end


def accelerate_launcher_pid() -> int | None:
    """The pid of accelerate's single-process launcher when it is this process's parent (Linux), else None.
    torchrun-style launchers (also `accelerate launch` with several processes) set LOCAL_RANK."""
    if "LOCAL_RANK" in os.environ:
        return None
    parent = os.getppid()
    try:
        argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    names = [os.path.basename(a) if i == 1 else a for i, a in enumerate(argv)]  # argv[1]: the script's path
    for pattern in _ACCELERATE_LAUNCH:
        n = len(pattern)
        if any(tuple(names[i:i + n]) == pattern for i in range(1, 3)):
            return parent
    return None


def elastic_agent_pid() -> int | None:
    """The pid of torchrun's agent (torch.distributed.elastic sets TORCHELASTIC_RUN_ID for its workers, which
    are its children), else None."""
    parent = os.getppid()
    return parent if "TORCHELASTIC_RUN_ID" in os.environ and parent > 1 else None


def signal_me_when_parent_dies(signum: int) -> bool:
    """prctl(PR_SET_PDEATHSIG): the kernel sends `signum` when the parent exits (0: nothing; Linux only)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    return False


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def end_launcher(elastic: bool = True) -> None:
    """End the launcher that would print a traceback for our non-zero exit (see above); nothing without one.
    `elastic`: also torchrun's agent, for a refusal every worker makes: the node's first worker ends it, the
    others wait until it is gone (so that it never sees one of them fail first)."""
    _flush()
    if (launcher := accelerate_launcher_pid()) is not None:
        signal_me_when_parent_dies(0)  # we end it: no SIGTERM back (the trainer may have asked for one)
        with contextlib.suppress(OSError):
            os.kill(launcher, signal.SIGTERM)
    elif elastic and (agent := elastic_agent_pid()) is not None:
        if os.environ.get("LOCAL_RANK", "0") == "0":
            with contextlib.suppress(OSError):
                os.kill(agent, signal.SIGKILL)
        else:
            deadline = time.monotonic() + _AGENT_WAIT_S
            while os.getppid() == agent and time.monotonic() < deadline:
                time.sleep(0.05)


@contextlib.contextmanager
def refusals_end_the_launcher(elastic: bool = True) -> Iterator[None]:
    """A non-zero SystemExit inside (a refusal, already said in one line) also ends the launcher (`end_launcher`)."""
    try:
        yield
    except SystemExit as e:
        if e.code not in (0, None):
            end_launcher(elastic)
        raise


def quiet_interrupt_while_starting(prog: str) -> None:
    """Until the trainer installs its own handlers: Ctrl-C is one line and exit 130, not a KeyboardInterrupt
    traceback from the import in progress plus one from accelerate's launcher, which got the Ctrl-C too (ended
    here first, before it prints; the shell then sees its 143)."""

    def interrupted(signum: int, frame) -> NoReturn:
        if os.environ.get("RANK", "0") == "0":
            os.write(2, f"{prog}: interrupted (Ctrl-C) while starting; nothing to save\n".encode())
        end_launcher(elastic=False)  # torchrun forwards the signal to every worker and reports it itself
        os._exit(EXIT_INTERRUPTED)  # not SystemExit: an import half done must not run its cleanup

    signal.signal(signal.SIGINT, interrupted)
