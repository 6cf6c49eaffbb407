"""Under the documented launchers (accelerate launch, torchrun) a refusal and a Ctrl-C while starting are the
trainer's one line, not the launcher's traceback as well (utils/launchers.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BAD = ["--pretrained_model_name_or_path", "toy", "--reward", "redness", "--kl_coeff", "-1"]
REFUSAL = "train_draftplus.py: error: --kl_coeff must be a finite number >= 0, got -1.0"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
       "PYTHONWARNINGS": "ignore"}
LAUNCHERS = {
    "python": [sys.executable, "train_draftplus.py"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml",
                   "train_draftplus.py"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_draftplus.py"],
}
# What the shell sees: our code where the trainer is the process it started, else how the launcher was ended
# (accelerate's with SIGTERM, torchrun's agent with SIGKILL: a signal, for subprocess a negative code).
REFUSAL_EXIT = {"python": 2, "accelerate": -signal.SIGTERM, "torchrun": -signal.SIGKILL}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_refusal_is_one_line_under_every_documented_launcher(launcher, tmp_path):
    done = subprocess.run([*LAUNCHERS[launcher], *BAD, "--output_dir", str(tmp_path / "out")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.stderr.strip().splitlines() == [REFUSAL], done.stderr[-3000:]
    assert done.returncode == REFUSAL_EXIT[launcher]


def _trainer_importing_torch(root_pid: int) -> bool:
    """Whether a train_draftplus.py process at or under `root_pid` has torch's library mapped (its slow imports
    have begun, after its Ctrl-C handler)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            pid = int(status.parent.name)
            cmdline = (status.parent / "cmdline").read_bytes()
            if b"train_draftplus.py" not in cmdline or b"accelerate" in cmdline:
                continue
            ppid = int(next(ln for ln in status.read_text().splitlines() if ln.startswith("PPid:")).split()[1])
            if (pid == root_pid or ppid == root_pid) and b"libtorch" in (status.parent / "maps").read_bytes():
                return True
        except (OSError, ValueError, StopIteration):
            continue
    return False


@pytest.mark.slow
@pytest.mark.parametrize("launcher,exit_code", [("python", 130), ("accelerate", -signal.SIGTERM)])
def test_ctrl_c_while_importing_is_one_line(launcher, exit_code, tmp_path):
    # A terminal's Ctrl-C reaches every process of the foreground group: the launcher and the trainer.
    proc = subprocess.Popen([*LAUNCHERS[launcher], *BAD[:4], "--output_dir", str(tmp_path / "out")], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not _trainer_importing_torch(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert stderr.strip().splitlines() == ["train_draftplus.py: interrupted (Ctrl-C) while starting; nothing to save"], \
        stderr[-3000:]
    assert proc.returncode == exit_code
