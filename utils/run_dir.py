"""One run per output directory: the lock, a previous run's files, and the run's metrics history.

The lock is a small JSON file (`.draftplus.lock`: host, pid, process start time, boot id) created
atomically in `--output_dir` by the main process before the run writes anything there. A second run
into the same directory refuses at once while the owner lives; a lock whose owner is gone (same host,
dead pid, e.g. after a `kill -9` or a node crash) is stale and is taken over with a notice. A lock
held on another host cannot be checked from here and counts as live.

Only the main process (global rank 0) ever creates or removes the lock; the other ranks learn the
outcome from it (see `claim_output_dir` in the trainer), so ranks never race for the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = ".draftplus.lock"
METRICS_NAME = "metrics.jsonl"
LORA_NAME = "pytorch_lora_weights.safetensors"


class RunDirError(Exception):
    """The output directory cannot take this run; the message is one line for the user."""


# ----------------------------------------------------------------------------------------------
# Who owns the lock
# ----------------------------------------------------------------------------------------------
def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _process_start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux); with the boot id it tells a live
    owner from an unrelated process that reused its pid."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name may hold spaces


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    start_ticks: str | None
    boot_id: str | None
    since: str
    token: str

    @classmethod
    def me(cls) -> LockOwner:
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, start_ticks=_process_start_ticks(pid),
                   boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
                   since=time.strftime("%Y-%m-%d %H:%M:%S"), token=uuid.uuid4().hex)

    def is_alive(self) -> bool:
        """True unless this owner is known to be gone. Owners on other hosts count as alive."""
        if self.host != socket.gethostname():
            return True
        if not isinstance(self.pid, int) or self.pid <= 0:
            return False  # unreadable; and never hand os.kill a pid <= 0 (those address process groups)
        if self.boot_id and self.boot_id != _read_text("/proc/sys/kernel/random/boot_id"):
            return False  # the machine rebooted since
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        ticks = _process_start_ticks(self.pid)
        return not (self.start_ticks and ticks and ticks != self.start_ticks)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.since}"


def read_lock(output_dir: str | os.PathLike) -> LockOwner | None:
    """The owner written in the directory's lock, None if there is no lock. An unreadable lock (cut
    short by a crash while it was written) reads as an owner that is gone."""
    text = _read_text(os.path.join(output_dir, LOCK_NAME))
    if text is None:
        return None
    try:
        fields = json.loads(text)
        return LockOwner(**{k: fields.get(k) for k in LockOwner.__dataclass_fields__})
    except (ValueError, TypeError):
        return LockOwner(host=socket.gethostname(), pid=-1, start_ticks=None, boot_id=None, since="?", token="")


def busy_message(output_dir: str | os.PathLike, owner: LockOwner) -> str:
    return (f"--output_dir {str(output_dir)!r} is in use by another run ({owner.describe()}); wait for it to "
            f"finish or choose another --output_dir (if that run is gone, delete {LOCK_NAME} in it)")


def check_not_in_use(output_dir: str | os.PathLike) -> None:
    """Read-only check (any rank, before anything starts): refuse a directory a live run holds."""
    owner = read_lock(output_dir)
    if owner is not None and owner.is_alive():
        raise RunDirError(busy_message(output_dir, owner))


# ----------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _host_mutex(directory: str) -> Iterator[None]:
    """Serialise lock acquisition among processes of this host (flock on the directory), so two runs
    that find the same stale lock cannot both take it over. A no-op where flock is unsupported."""
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

    `acquire()` creates the directory if needed; `release()` removes the lock and, when this run
    created the directory and left nothing else in it (a run that failed before writing anything),
    the directory too, so bad input leaves no trace.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = os.path.abspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_NAME)
        self.owner = LockOwner.me()
        self.created_dirs: list[str] = []
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns a notice when a stale lock was taken over. RunDirError if a live run holds it."""
        missing, d = [], self.output_dir
        while not os.path.exists(d):
            missing.append(d)
            d = os.path.dirname(d)
        os.makedirs(self.output_dir, exist_ok=True)
        self.created_dirs = missing  # innermost first
        notice = None
        with _host_mutex(self.output_dir):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                previous = read_lock(self.output_dir)
                if previous is not None and previous.is_alive():
                    self._remove_created_dirs()
                    raise RunDirError(busy_message(self.output_dir, previous)) from None
                notice = (f"taking over a stale lock in {self.output_dir} "
                          f"({previous.describe() if previous else '?'}: that run ended without releasing it)")
                tmp = f"{self.path}.{self.owner.token}"
                fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                self._write(fd)
                os.replace(tmp, self.path)
            else:
                self._write(fd)
        self.held = True
        return notice

    def _write(self, fd: int) -> None:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.owner), f)
            f.flush()
            os.fsync(f.fileno())

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent; safe to call from atexit)."""
        if not self.held:
            return
        self.held = False
        current = read_lock(self.output_dir)
        if current is not None and current.token == self.owner.token:
            with contextlib.suppress(OSError):
                os.remove(self.path)
        self._remove_created_dirs()

    def _remove_created_dirs(self) -> None:
        for d in self.created_dirs:  # innermost first; rmdir only succeeds on an empty directory
            with contextlib.suppress(OSError):
                os.rmdir(d)


# ----------------------------------------------------------------------------------------------
# A previous run's files
# ----------------------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: str | os.PathLike) -> list[str]:
    """Names of complete and partial checkpoints (checkpoint-N, checkpoint-N.partial, ...)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-"))


def previous_run_files(output_dir: str | os.PathLike) -> list[str]:
    """What an earlier run left that a fresh run would mix with: checkpoints, metrics, the final LoRA."""
    found = checkpoint_dirs(output_dir)
    for name in (METRICS_NAME, LORA_NAME):
        if os.path.isfile(os.path.join(output_dir, name)):
            found.append(name)
    return found


def clear_previous_run(output_dir: str | os.PathLike, logging_dir: str) -> None:
    """`--overwrite_output_dir`: remove the previous run's checkpoints, metrics and tracker logs, so
    `latest`, checkpoint rotation and the metrics history see only the new run. Other files are
    overwritten when the new run writes them."""
    for name in checkpoint_dirs(output_dir):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(output_dir, METRICS_NAME))
    logs, root = os.path.realpath(os.path.join(output_dir, logging_dir)), os.path.realpath(output_dir)
    if os.path.isdir(logs) and logs.startswith(root + os.sep):  # never a --logging_dir outside the run's directory
        shutil.rmtree(logs, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The metrics history
# ----------------------------------------------------------------------------------------------
def truncate_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Keep the lines of steps <= `last_step` (a resumed run rewrites the later ones); atomic. Returns
    how many lines were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a line cut short by a crash
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


# ----------------------------------------------------------------------------------------------
# Claiming the directory for a run
# ----------------------------------------------------------------------------------------------
def claim_output_dir(accelerator, output_dir: str, overwrite: bool, logging_dir: str) -> str | None:
    """The main process takes the directory's lock (released at exit, also on signals and errors) and,
    with `overwrite`, clears the previous run. Every process learns the outcome, so all raise
    RunDirError together when the directory is taken. Returns a stale-lock notice, if any."""
    import atexit

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
