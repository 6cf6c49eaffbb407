"""One run per output directory: the lock, a previous run's files, and the run's metrics history.

The lock is a small JSON file (`.draftplus.lock`: host, pid, process start time) that the main process
creates in `--output_dir` before the run writes anything there, and removes when it exits. A second run
into the directory is refused while the owner lives. A lock whose owner is gone (same host, and its pid
dead or reused by another process, e.g. after a `kill -9`) is stale and is taken over with a notice; so
is an unreadable one (cut short by a crash). A lock held on another host cannot be checked from here and
counts as live.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from utils.errors import UserError
from utils.evaluation.run_settings import SETTINGS_NAME
from utils.lora import COMFYUI_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from utils.run.model_card import CARD_NAME, is_draftplus_card
from utils.run.plots import CURVES_NAME
from utils.run.prompt_cache import CACHE_DIR as PROMPT_CACHE_DIR
from utils.run.validation import (
    BEFORE_AFTER_NAME,
    EARLIER_LOG_PATTERN,
    VALIDATION_DIR,
    VALIDATION_LOG,
    VALIDATION_REWARD_NAME,
)

LOCK_NAME = ".draftplus.lock"
METRICS_NAME = "metrics.jsonl"
# Everything a run derives in its --output_dir besides checkpoint-N/ and the tracker logs: what
# --overwrite_output_dir removes, so that nothing of the earlier run is read or shown as the new one's.
RUN_FILES = (LORA_WEIGHTS_NAME, SETTINGS_NAME, KOHYA_WEIGHTS_NAME, COMFYUI_WEIGHTS_NAME, METRICS_NAME, VALIDATION_LOG, BEFORE_AFTER_NAME,
             VALIDATION_REWARD_NAME, CURVES_NAME)
RUN_FILE_PATTERNS = (EARLIER_LOG_PATTERN.format(step="*"),)
RUN_DIRS = (VALIDATION_DIR, PROMPT_CACHE_DIR)


class RunDirError(UserError):
    """The output directory cannot take this run."""


def _process_start_ticks(pid: int) -> str | None:
    """The process's start time since boot (Linux): tells a live owner from a process that reused its pid."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22
    return None


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    start_ticks: str | None
    since: str
    token: str  # this run's own: a lock is released only by the run that wrote it

    @classmethod
    def me(cls) -> LockOwner:
        return cls(host=socket.gethostname(), pid=os.getpid(), start_ticks=_process_start_ticks(os.getpid()),
                   since=time.strftime("%Y-%m-%d %H:%M:%S"), token=uuid.uuid4().hex)

    def is_alive(self) -> bool:
        """True unless this owner is known to be gone. Owners on other hosts count as alive."""
        if self.host != socket.gethostname():
            return True
        if not isinstance(self.pid, int) or self.pid <= 0:
            return False  # unreadable; and never hand os.kill a pid <= 0 (those address process groups)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        ticks = _process_start_ticks(self.pid)
        return not (self.start_ticks and ticks and ticks != self.start_ticks)


def read_lock(output_dir: str | os.PathLike) -> LockOwner | None:
    """The owner written in the directory's lock, None without one; an unreadable lock reads as a gone owner."""
    try:
        text = Path(output_dir, LOCK_NAME).read_text()
    except OSError:
        return None
    try:
        fields = json.loads(text)
        return LockOwner(**{k: fields.get(k) for k in LockOwner.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError):
        return LockOwner(host=socket.gethostname(), pid=-1, start_ticks=None, since="?", token="")


def _busy(output_dir: str | os.PathLike, owner: LockOwner | None) -> RunDirError:
    who = f"pid {owner.pid} on {owner.host}, since {owner.since}" if owner else "just now"
    return RunDirError(f"--output_dir {str(output_dir)!r} is in use by another run ({who}); wait for it to finish "
                       f"or choose another --output_dir (if that run is gone, delete {LOCK_NAME} in it)")


def check_not_in_use(output_dir: str | os.PathLike) -> None:
    """RunDirError when a live run holds the directory (read-only: any rank, before anything starts)."""
    owner = read_lock(output_dir)
    if owner is not None and owner.is_alive():
        raise _busy(output_dir, owner)


@contextlib.contextmanager
def _one_at_a_time(directory: str) -> Iterator[None]:
    """Serialise lock taking among the processes of this host (flock on the directory), so two runs that
    find the same stale lock cannot both take it over. A no-op where flock is unsupported."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the flock


class OutputDirLock:
    """The lock of one output directory, held by the main process for the whole run.

    `acquire()` creates the directory if needed; `release()` removes the lock and the directories this
    run created if it left them empty (a run that failed before writing anything leaves no trace).
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = os.path.abspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_NAME)
        self.owner = LockOwner.me()
        self.created_dirs: list[str] = []  # innermost first
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a notice when a stale lock was taken over. RunDirError if a live run holds it."""
        d = self.output_dir
        while not os.path.exists(d):
            self.created_dirs.append(d)
            d = os.path.dirname(d)
        os.makedirs(self.output_dir, exist_ok=True)
        with _one_at_a_time(self.output_dir):
            previous = read_lock(self.output_dir)
            if previous is not None and previous.is_alive():
                self._remove_created_dirs()
                raise _busy(self.output_dir, previous)
            if previous is not None:  # stale: the run that wrote it is gone
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
            try:  # O_EXCL: of two runs (on any hosts) that get here together, exactly one creates the lock
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._remove_created_dirs()
                raise _busy(self.output_dir, read_lock(self.output_dir)) from None
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(self.owner), f)
        self.held = True
        if previous is None:
            return None
        return (f"taking over a stale lock in {self.output_dir} (pid {previous.pid} on {previous.host}, since "
                f"{previous.since}: that run ended without releasing it)")

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent; safe to call from atexit)."""
        if self.held:
            self.held = False
            current = read_lock(self.output_dir)
            if current is not None and current.token == self.owner.token:
                with contextlib.suppress(OSError):
                    os.remove(self.path)
        self._remove_created_dirs()

    def _remove_created_dirs(self) -> None:
        for d in self.created_dirs:  # rmdir only removes an empty directory
            with contextlib.suppress(OSError):
                os.rmdir(d)


# ----------------------------------------------------------------------------------------------
# A previous run's files
# ----------------------------------------------------------------------------------------------
def previous_run_files(output_dir: str | os.PathLike) -> list[str]:
    """What an earlier run left that a fresh run would mix with: checkpoints (also partial ones), then
    the files and directories it derived (metrics, LoRA files, validation, curves, its model card)."""
    if not os.path.isdir(output_dir):
        return []
    out = Path(output_dir)
    found = sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-"))
    found += [f for f in RUN_FILES if (out / f).is_file()]
    found += sorted(p.name for pattern in RUN_FILE_PATTERNS for p in out.glob(pattern))
    found += [d for d in RUN_DIRS if (out / d).is_dir()]
    if (out / CARD_NAME).is_file() and is_draftplus_card(out / CARD_NAME):
        found.append(CARD_NAME)
    return found


def clear_previous_run(output_dir: str | os.PathLike, logging_dir: str) -> None:
    """`--overwrite_output_dir`: remove everything the previous run wrote (`previous_run_files`) and its
    tracker logs, so that `latest`, checkpoint rotation, the metrics and validation histories, the curves,
    the card and the LoRA files all come from the new run. Files a run does not write are left alone."""
    for name in previous_run_files(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    logs, root = os.path.realpath(os.path.join(output_dir, logging_dir)), os.path.realpath(output_dir)
    if os.path.isdir(logs) and logs.startswith(root + os.sep):  # never a --logging_dir outside the run's directory
        shutil.rmtree(logs, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The metrics history
# ----------------------------------------------------------------------------------------------
def truncate_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Keep the lines of steps <= `last_step` (a resumed run rewrites the later ones); atomic. Returns
    how many lines were dropped (a line cut short by a crash is dropped too)."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if _step_of(line) <= last_step]
    if len(kept) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def _step_of(line: str) -> float:
    """The step of a metrics line; infinity for a line cut short by a crash, so that it is dropped."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return json.loads(line)["step"]
    return math.inf


# ----------------------------------------------------------------------------------------------
# Claiming the directory for a run
# ----------------------------------------------------------------------------------------------
def claim_output_dir(accelerator, output_dir: str, overwrite: bool, logging_dir: str) -> str | None:
    """The main process takes the directory's lock (released at exit, also on signals and errors) and,
    with `overwrite`, clears the previous run. Every process learns the outcome, so all raise
    RunDirError together when the directory is taken. Returns a stale-lock notice, if any."""
    message, notice = None, None
    if accelerator.is_main_process:
        lock = OutputDirLock(output_dir)
        try:
            notice = lock.acquire()
        except (RunDirError, OSError) as e:
            message = str(e)
        else:
            atexit.register(lock.release)
            if overwrite:
                clear_previous_run(output_dir, logging_dir)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message])[0]
    if message:
        raise RunDirError(message)
    return notice
