"""Never lose a run: the lock, signals, non-finite steps, failed writes, resume, secrets, multi-node.

The units (lock, metrics history, guards, signal handling, resume checks, launch checks) are tested
in this process; the behaviours a user sees are tested on the real command line with real signals.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from utils.lora import unmatched_targets
from utils.run.arg_checks import ArgumentError, check_launch, check_process_count, world_size_from_env
from utils.run.checkpoints import ResumeMismatchError, check_resume_compatible, read_run_config
from utils.run.guards import (
    NonFiniteError,
    NonFiniteSteps,
    ensure_finite_weights,
    finite_or_none,
    lora_digest,
)
from utils.run.output_dir import LOCK_NAME, LockOwner, OutputDirLock, RunDirError, read_lock, truncate_metrics
from utils.run.preemption import Preemption

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_draftplus.py")
LORA = "pytorch_lora_weights.safetensors"


# ----------------------------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(directory: Path, **fields) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    owner = {**LockOwner.me().__dict__, **fields}
    (directory / LOCK_NAME).write_text(json.dumps(owner))


def test_lock_refuses_a_live_owner_and_cleans_up_a_directory_it_created(tmp_path):
    out = tmp_path / "a" / "run"
    first = OutputDirLock(out)
    assert first.acquire() is None
    assert read_lock(out).pid == os.getpid() and read_lock(out).host == socket.gethostname()
    with pytest.raises(RunDirError, match=rf"is in use by another run \(pid {os.getpid()} on "):
        OutputDirLock(out).acquire()
    first.release()
    assert not (tmp_path / "a").exists()  # created by the lock, left empty: removed with it

    kept = OutputDirLock(out)
    kept.acquire()
    (out / "metrics.jsonl").write_text("{}\n")
    kept.release()
    kept.release()  # idempotent
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


@pytest.mark.parametrize("owner", ["dead pid", "reused pid", "unreadable"])
def test_a_stale_lock_is_taken_over_with_a_notice(owner, tmp_path):
    if owner == "dead pid":
        write_lock(tmp_path, pid=dead_pid())
    elif owner == "reused pid":  # our pid, but another process start time: the owner is gone
        if LockOwner.me().start_ticks is None:
            pytest.skip("needs /proc")
        write_lock(tmp_path, start_ticks="1")
    else:
        (tmp_path / LOCK_NAME).write_text('{"host": "vm", "pi')  # cut short by a crash
    lock = OutputDirLock(tmp_path)
    assert "taking over a stale lock" in lock.acquire()
    assert read_lock(tmp_path).token == lock.owner.token
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_lock_held_on_another_host_counts_as_live(tmp_path):
    write_lock(tmp_path, host="some-other-node", pid=dead_pid())
    with pytest.raises(RunDirError, match="on some-other-node"):
        OutputDirLock(tmp_path).acquire()
    assert read_lock(tmp_path).host == "some-other-node"  # untouched


def test_overwrite_clears_the_previous_run_but_nothing_outside_the_directory(tmp_path):
    from utils.run.output_dir import clear_previous_run, previous_run_files

    out, elsewhere = tmp_path / "run", tmp_path / "tensorboard"
    for path in (out / "checkpoint-5", out / "checkpoint-7.partial", out / "logs" / "x", elsewhere / "y"):
        path.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    assert previous_run_files(out) == ["checkpoint-5", "checkpoint-7.partial", "metrics.jsonl"]
    clear_previous_run(out, str(elsewhere))  # an absolute --logging_dir elsewhere is left alone
    assert elsewhere.joinpath("y").is_dir() and previous_run_files(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["logs", "notes.txt"]
    clear_previous_run(out, "logs")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_truncate_metrics_keeps_the_resumed_history_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": -s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert truncate_metrics(path, 4) == 4  # steps 5-7 and the line cut short
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert truncate_metrics(path, 10) == 0 and truncate_metrics(tmp_path / "none.jsonl", 0) == 0
    truncate_metrics(path, 0)
    assert path.read_text() == ""


class FakeAccelerator:
    """What the guards use of an Accelerator, for one process."""

    device = torch.device("cpu")
    num_processes = 1
    scaler = None

    def reduce(self, tensor, reduction="sum"):
        return tensor.clone()


def test_nonfinite_steps_are_counted_and_stop_after_max_in_a_row():
    guard, acc = NonFiniteSteps(max_consecutive=2), FakeAccelerator()
    assert guard.check(acc, torch.tensor(1.0), 0.5, step=1)
    assert not guard.check(acc, torch.tensor(float("nan")), 0.5, step=2)
    assert guard.check(acc, torch.tensor(1.0), 0.5, step=3) and guard.consecutive == 0
    assert not guard.check(acc, torch.tensor(1.0), float("inf"), step=4)  # gradients too
    assert not guard.exhausted
    assert not guard.check(acc, torch.tensor(float("-inf")), 0.5, step=5)
    assert guard.exhausted and guard.total == 3
    assert "2 steps in a row (steps 4-5)" in guard.stop_message("out/checkpoint-3")
    # under an fp16 loss scaler an overflowing gradient is the scaler's to skip, not ours
    scaled = FakeAccelerator()
    scaled.scaler = object()
    assert NonFiniteSteps(2).check(scaled, torch.tensor(1.0), float("inf"), step=1)


def test_a_step_skipped_under_a_loss_scaler_leaves_the_scaler_ready_for_the_next_step():
    """fp16: accelerate unscales the gradients for clipping before we decide; skipping must still close
    the scaler's step, or the next step's unscale raises."""
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    acc = FakeAccelerator()
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    guard = NonFiniteSteps(3)
    for step, loss_value in enumerate([float("nan"), 1.0], start=1):
        acc.scaler.scale((weight * loss_value).sum()).backward()
        acc.scaler.unscale_(optimizer)  # what accelerator.clip_grad_norm_ does under fp16
        if guard.check(acc, torch.tensor(loss_value), 0.0, step):
            acc.scaler.step(optimizer)  # what the prepared optimizer's step() does under fp16
            acc.scaler.update()
        optimizer.zero_grad()
    assert guard.total == 1 and not torch.equal(weight.detach(), torch.ones(2))  # step 2 updated


def test_non_finite_weights_are_never_written_and_json_gets_null():
    params = [torch.zeros(3), torch.tensor([1.0, float("nan")])]
    with pytest.raises(NonFiniteError, match="checkpoint-5 was not written"):
        ensure_finite_weights(FakeAccelerator(), params, "checkpoint-5")
    ensure_finite_weights(FakeAccelerator(), params[:1], "checkpoint-5")
    line = finite_or_none({"loss": float("nan"), "lr": 0.1, "reward_by_process": [float("inf"), 1.0]})
    assert json.dumps(line) == '{"loss": null, "lr": 0.1, "reward_by_process": [null, 1.0]}'


def test_lora_digest_ignores_key_order_and_the_unet_prefix_but_not_values():
    a = {"x.lora.down.weight": torch.ones(2, 2), "y.lora.up.weight": torch.zeros(2)}
    b = {"unet.y.lora.up.weight": torch.zeros(2), "unet.x.lora.down.weight": torch.ones(2, 2)}
    assert lora_digest(a) == lora_digest(b)
    b["unet.y.lora.up.weight"] = torch.tensor([0.0, 1e-7])
    assert lora_digest(a) != lora_digest(b)


def test_signals_exit_before_training_and_stop_at_a_step_boundary_after():
    preemption = Preemption().install()
    try:
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert exit_info.value.code == 143
        preemption.arm()
        assert preemption.requested(FakeAccelerator()) is None
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the flag is set, the run goes on
        assert preemption.requested(FakeAccelerator()) == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C quits at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        preemption.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_resume_checks_use_the_run_config_or_the_lora_metadata_of_older_checkpoints(tiny_sd_path, tmp_path):
    from diffusers import UNet2DConditionModel

    from utils.families import family_of
    from utils.lora import add_lora, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    add_lora(unet, rank=4, lora_alpha=8, target_modules=["to_q", "to_v"])
    save_lora(unet, tmp_path, family_of(str(tiny_sd_path)))  # a checkpoint without draftplus_run.json
    assert read_run_config(str(tmp_path)) == {"rank": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_v"]}
    same = {"rank": 4, "lora_alpha": 8, "target_modules": ["to_v", "to_q"], "base_model": "x"}
    check_resume_compatible(str(tmp_path), same)
    with pytest.raises(ResumeMismatchError, match="--lora_alpha 8, not 4"):
        check_resume_compatible(str(tmp_path), {**same, "lora_alpha": 4})
    with pytest.raises(ResumeMismatchError, match="has LoRA on to_q to_v, not to_k"):
        check_resume_compatible(str(tmp_path), {**same, "target_modules": ["to_k"]})
    # the same denoiser under another path is the same base model
    for recorded in ("denoiser_config_sha256", "unet_config_sha256"):  # the latter: checkpoints of earlier versions
        (tmp_path / "draftplus_run.json").write_text(json.dumps({**same, "base_model": "/old/path", recorded: "abc"}))
        check_resume_compatible(str(tmp_path), {**same, "base_model": "/new/path", "denoiser_config_sha256": "abc"})
        with pytest.raises(ResumeMismatchError, match="trained on '/old/path', not '/new/path'"):
            check_resume_compatible(str(tmp_path), {**same, "base_model": "/new/path", "denoiser_config_sha256": "def"})


def test_the_argument_check_fingerprints_the_denoiser_config_it_read(tiny_sd_path, tmp_path):
    """What a checkpoint records to recognise its base model under another path: the sha256 of the denoiser's
    config.json (keys without "_"); none for the built-in toy, which is recognised by its name."""
    import hashlib

    import train_draftplus

    def fingerprint(model):
        args = train_draftplus.parse_args(["--pretrained_model_name_or_path", str(model), "--reward", "redness",
                                           "--resolution", "32", "--output_dir", str(tmp_path / "out"),
                                           "--report_to", "none"])
        return args.checked.run_config["denoiser_config_sha256"]

    config = json.loads((Path(tiny_sd_path) / "unet" / "config.json").read_text())
    public = {k: v for k, v in config.items() if not k.startswith("_")}
    assert fingerprint(tiny_sd_path) == hashlib.sha256(json.dumps(public, sort_keys=True).encode()).hexdigest()
    assert fingerprint("toy") is None


def test_targets_match_like_peft_by_name_or_last_parts():
    names = ["down.0.attn1.to_q", "down.0.attn1.to_out.0", "mid.ff.net.2"]
    assert unmatched_targets(names, ["to_q", "to_out.0", "ff.net.2", "net.2"]) == []
    assert unmatched_targets(names, ["to_q", "o_q", "to_out", "no_such"]) == ["o_q", "to_out", "no_such"]


def test_launch_checks_catch_the_silent_single_process_launches(monkeypatch):
    import utils.run.arg_checks as arg_checks

    monkeypatch.setattr(arg_checks, "has_accelerator_device", lambda: False)
    assert world_size_from_env({"WORLD_SIZE": "4"}) == 4 and world_size_from_env({}) == 1
    check_launch({})
    check_launch({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "true"})  # a real gloo run
    with pytest.raises(ArgumentError, match="ACCELERATE_USE_CPU=true"):
        check_launch({"WORLD_SIZE": "2", "RANK": "1"})  # torchrun on CPU without it
    with pytest.raises(ArgumentError, match="started one process here"):  # accelerate MULTI_CPU, no mpirun
        check_launch({"ACCELERATE_USE_CPU": "True", "ACCELERATE_DYNAMO_BACKEND": "NO", "MASTER_ADDR": "10.0.0.1"})
    check_launch({"ACCELERATE_USE_CPU": "True", "ACCELERATE_DYNAMO_BACKEND": "NO"})  # accelerate, one process
    check_process_count(2, {"WORLD_SIZE": "2"})
    with pytest.raises(ArgumentError, match="started 2 processes but accelerate joined 1"):
        check_process_count(1, {"WORLD_SIZE": "2"})


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def base_args(model, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--reward", "redness", "--prompts", "animals",
            "--resolution", "32", "--num_inference_steps", "3", "--guidance_scale", "3", "--rank", "4",
            "--learning_rate", "1e-2", "--output_dir", str(out), "--report_to", "none", *extra]


def env_with(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def run(cmd, **env):
    return subprocess.run(cmd, cwd=ROOT, env=env_with(**env), capture_output=True, text=True, timeout=600)


def start(cmd, log, **env):
    return subprocess.Popen(cmd, cwd=ROOT, env=env_with(**env), stdout=log, stderr=subprocess.STDOUT, text=True)


def metric_steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def wait_for_lines(out, count, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = Path(out) / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, "the run ended early"
        time.sleep(0.05)
    raise TimeoutError


def max_abs_difference(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_preempted_and_crashed_runs_resume_to_the_lora_of_an_uninterrupted_run(tiny_sd_path, tmp_path):
    long = ["--max_train_steps", "5000", "--checkpointing_steps", "2"]
    term, kill = tmp_path / "term", tmp_path / "kill"
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("term", "kill", "term2", "kill2", "straight")}
    runs = {name: start([sys.executable, SCRIPT, *base_args(tiny_sd_path, out, *long)], logs[name])
            for name, out in (("term", term), ("kill", kill))}
    wait_for_lines(term, 3, runs["term"])
    wait_for_lines(kill, 5, runs["kill"])
    # A second run into a directory in use is refused at once.
    second = run([sys.executable, SCRIPT, *base_args(tiny_sd_path, term, *long, "--resume_from_checkpoint", "latest")])
    assert runs["term"].poll() is None
    # SIGTERM (a preemption notice): a checkpoint at the current step, one line, exit 143.
    runs["term"].send_signal(signal.SIGTERM)
    # SIGKILL (a crash): the lock stays behind and metrics.jsonl runs past the last checkpoint.
    runs["kill"].kill()
    assert runs["term"].wait(timeout=300) == 143
    runs["kill"].wait()
    assert second.returncode == 2 and f"is in use by another run (pid {runs['term'].pid}" in second.stderr
    output = (tmp_path / "term.log").read_text()
    stopped = int(output.split("Stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped >= 3 and "Traceback" not in output
    assert (term / f"checkpoint-{stopped}" / LORA).is_file() and not (term / LOCK_NAME).exists()
    assert metric_steps(term) == list(range(1, stopped + 1))
    killed = len(metric_steps(kill))
    assert (kill / LOCK_NAME).exists() and read_lock(kill).pid == runs["kill"].pid

    # Both resume with `latest` and end with the LoRA of an uninterrupted run, and with exactly their
    # own metrics history.
    total = max(stopped, killed) + 3
    finish = ["--max_train_steps", str(total), "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"]
    straight = tmp_path / "straight"
    finishing = {"term2": start([sys.executable, SCRIPT, *base_args(tiny_sd_path, term, *finish)], logs["term2"]),
                 "kill2": start([sys.executable, SCRIPT, *base_args(tiny_sd_path, kill, *finish)], logs["kill2"]),
                 "straight": start([sys.executable, SCRIPT, *base_args(tiny_sd_path, straight, "--max_train_steps",
                                                                      str(total))], logs["straight"])}
    for name, proc in finishing.items():
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    for log in logs.values():
        log.close()
    assert f"taking over a stale lock in {kill} (pid {runs['kill'].pid}" in (tmp_path / "kill2.log").read_text()
    for out in (term, kill):
        assert metric_steps(out) == list(range(1, total + 1))
        assert max_abs_difference(out / LORA, straight / LORA) <= 1e-6
    assert max_abs_difference(term / "checkpoint-2" / LORA, term / LORA) > 1e-6  # and it did train


def worker_of_rank(launcher_pid, rank):
    """The pid of the torchrun worker with RANK=rank (Linux /proc)."""
    for task in Path(f"/proc/{launcher_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return int(child)
    raise LookupError(rank)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker through /proc")
def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step_with_one_checkpoint(tiny_sd_path, tmp_path):
    out = tmp_path / "ddp"
    with open(tmp_path / "ddp.log", "w") as log:
        launcher = start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", SCRIPT, *base_args(tiny_sd_path, out, "--max_train_steps", "5000",
                                                      "--checkpointing_steps", "1000")],
                         log, ACCELERATE_USE_CPU="true")
        wait_for_lines(out, 3, launcher)
        os.kill(worker_of_rank(launcher.pid, 1), signal.SIGTERM)  # as a scheduler signalling one node would
        launcher.wait(timeout=300)
    output = (tmp_path / "ddp.log").read_text()
    assert "exitcode  : 143" in output, output[-3000:]  # stopped for the signal (torchrun lists what it saw)
    stopped = int(output.split("Stopped by SIGTERM at step ")[1].split(";")[0])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{stopped}"]
    assert {p.name for p in (out / f"checkpoint-{stopped}").iterdir()} >= {
        "random_states_0.pkl", "random_states_1.pkl", LORA, "optimizer.bin", "draftplus_run.json"}
    assert metric_steps(out) == list(range(1, stopped + 1)) and not (out / LOCK_NAME).exists()


NAN_REWARD = """
import os
CALLS = [0]
NAN_AT = {int(s) for s in os.environ["NAN_AT"].split(",")}


def red(images, prompts):
    CALLS[0] += 1  # one call per training step here (batch 1, no accumulation, no validation)
    score = images[:, 0].mean(dim=(1, 2))
    return score * float("nan") if CALLS[0] in NAN_AT else score
"""


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny_sd_path, tmp_path):
    reward = tmp_path / "nan_reward.py"
    reward.write_text(NAN_REWARD)
    out = tmp_path / "nan"
    result = run([sys.executable, SCRIPT, *base_args(tiny_sd_path, out, "--max_train_steps", "10",
                                                     "--checkpointing_steps", "1", "--max_nonfinite_steps", "3"),
                  "--reward", f"{reward}:red"], NAN_AT="3,6,7,8")
    assert result.returncode == 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "3 steps in a row (steps 6-8) had a non-finite loss or gradient" in errors[0]
    assert f"last checkpoint: {out / 'checkpoint-7'}" in errors[0]
    assert "Traceback" not in result.stderr and "differ across processes" not in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert [r["step"] for r in rows if r["loss"] is None] == [3, 6, 7, 8]
    assert not (out / LORA).exists()  # the run stopped: no final LoRA
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == list(range(1, 8))
    loras = {s: load_file(str(out / f"checkpoint-{s}" / LORA)) for s in range(1, 8)}
    assert all(torch.isfinite(t).all() for lora in loras.values() for t in lora.values())

    def same(a, b):
        return all(torch.equal(loras[a][k], loras[b][k]) for k in loras[a])

    # a skipped step changed nothing; the others trained
    assert same(2, 3) and same(5, 6) and same(6, 7)
    assert not same(1, 2) and not same(3, 4) and not same(4, 5)
    optimizer = torch.load(out / "checkpoint-7" / "optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {4.0}  # 7 steps, 3 skipped
    scheduler = torch.load(out / "checkpoint-7" / "scheduler.bin", weights_only=True)
    assert scheduler["last_epoch"] == 4  # no LR-scheduler step on a skipped step


FAILING_DISK = """
import errno, os, sys
import safetensors.torch

FAIL_AT = {int(s) for s in os.environ["FAIL_AT"].split(",")}
calls = [0]
save_file = safetensors.torch.save_file


def full_disk(tensors, filename, metadata=None):
    calls[0] += 1
    if calls[0] in FAIL_AT:
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    return save_file(tensors, filename, metadata=metadata)


safetensors.torch.save_file = full_disk
sys.argv = ["train_draftplus.py"] + sys.argv[1:]
import train_draftplus

train_draftplus.main(train_draftplus.parse_args())
"""


@pytest.mark.slow
def test_failed_writes_keep_the_previous_checkpoint_and_lora_and_say_what_failed(tiny_sd_path, tmp_path):
    wrapper = tmp_path / "full_disk.py"
    wrapper.write_text(FAILING_DISK)
    out = tmp_path / "run"
    # safetensors writes: 1 = checkpoint-1, 2 = checkpoint-2 (fails), 3 = checkpoint-3, 4 = the LoRA
    first = run([sys.executable, str(wrapper), *base_args(tiny_sd_path, out, "--max_train_steps", "3",
                                                          "--checkpointing_steps", "1")], FAIL_AT="2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (f"could not write checkpoint-2 (OSError: [Errno {errno.ENOSPC}] No space left on device" in first.stderr
            and "checkpoint-1 is intact; training goes on" in first.stderr)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]
    lora_before = (out / LORA).read_bytes()
    checkpoint_before = {p.name: p.read_bytes() for p in (out / "checkpoint-3").iterdir()}

    # Resumed, the disk fills up: checkpoint-4 (write 1) and the final LoRA (write 2) fail.
    second = run([sys.executable, str(wrapper), *base_args(tiny_sd_path, out, "--max_train_steps", "4",
                                                           "--checkpointing_steps", "1",
                                                           "--resume_from_checkpoint", "latest")], FAIL_AT="1,2")
    assert second.returncode == 1
    errors = [line for line in second.stderr.splitlines() if "error" in line.lower()]
    assert any("could not write checkpoint-4" in e and "checkpoint-3 is intact" in e for e in errors), errors
    final = [e for e in errors if e.startswith("train_draftplus.py: error:")]
    assert len(final) == 1 and f"could not write {out / LORA}" in final[0]
    assert "the LoRA already there is intact" in final[0] and "newest checkpoint is" in final[0]
    assert "Traceback" not in second.stderr
    assert (out / LORA).read_bytes() == lora_before
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-3").iterdir()} == checkpoint_before
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith((".partial", ".old"))]
    assert leftovers == [] and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]


@pytest.mark.slow
def test_overwrite_starts_over_and_no_token_reaches_any_file_or_output(tiny_sd_path, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-50").mkdir(parents=True)
    (out / "checkpoint-50" / LORA).write_bytes(b"old")
    (out / "logs" / "draftplus").mkdir(parents=True)
    (out / "logs" / "draftplus" / "events.old").write_text("old")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 51)))
    cli_token, env_token = "hf_CommandLineSecret0123456789", "hf_EnvironmentSecret0123456789"
    result = run([sys.executable, SCRIPT, *base_args(tiny_sd_path, out, "--max_train_steps", "2",
                                                     "--checkpointing_steps", "1", "--overwrite_output_dir",
                                                     "--report_to", "tensorboard", "--validation_prompts", "a cat",
                                                     "--num_validation_images", "1", "--hub_token", cli_token)],
                 HF_TOKEN=env_token)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert metric_steps(out) == [1, 2] and not (out / "logs" / "draftplus" / "events.old").exists()
    warnings = [line for line in result.stderr.splitlines() if "--hub_token" in line]
    assert len(warnings) == 1 and "visible to other users" in warnings[0]
    run_config = json.loads((out / "checkpoint-2" / "draftplus_run.json").read_text())
    assert run_config["rank"] == 4 and "hub_token" not in run_config["args"]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("events.out.tfevents" in p.name for p in files) and (out / "README.md").is_file()
    for path in files:
        data = path.read_bytes()
        assert cli_token.encode() not in data and env_token.encode() not in data, path
    assert cli_token not in result.stdout + result.stderr and env_token not in result.stdout + result.stderr


DRIFTING_RANK = """
import os, sys
import torch

if os.environ["RANK"] == "1":  # a desync: rank 1's optimizer nudges one weight after each update
    step = torch.optim.AdamW.step

    def drifting(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].add_(1e-3)
        return out

    torch.optim.AdamW.step = drifting
sys.argv = ["train_draftplus.py"] + sys.argv[1:]
import train_draftplus

train_draftplus.main(train_draftplus.parse_args())
"""


@pytest.mark.slow
def test_a_real_desync_across_ranks_stops_the_run_before_the_lora_is_written(tiny_sd_path, tmp_path):
    wrapper = tmp_path / "drifting_rank.py"
    wrapper.write_text(DRIFTING_RANK)
    out = tmp_path / "desync"
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29549",
                  str(wrapper), *base_args(tiny_sd_path, out, "--max_train_steps", "2", "--checkpointing_steps", "5")],
                 ACCELERATE_USE_CPU="true")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("train_draftplus.py: error:")]
    assert len(errors) == 1 and "the LoRA weights differ across processes (sha256 " in errors[0], result.stderr[-3000:]
    assert "data-parallel desync; the LoRA was not written" in errors[0] and "exitcode  : 1 " in result.stderr
    assert not (out / LORA).exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate multi_node.yaml"])
def test_two_nodes_on_localhost_train_one_lora_equal_on_both_ranks(launcher, tiny_sd_path, tmp_path):
    out = tmp_path / "two-nodes"
    port = {"torchrun": "29541", "accelerate multi_node.yaml": "29543"}[launcher]
    args = base_args(tiny_sd_path, out, "--max_train_steps", "3", "--checkpointing_steps", "2")
    procs = []
    for rank in (0, 1):
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                   "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port, SCRIPT, *args]
        else:  # the committed config, with its machine-specific values overridden for localhost on CPU
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "accelerate_configs" / "multi_node.yaml"), "--machine_rank", str(rank),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", "2",
                   "--mixed_precision", "no", SCRIPT, *args]
        log = open(tmp_path / f"node{rank}.log", "w")
        procs.append((start(cmd, log, ACCELERATE_USE_CPU="true"), log))
    for proc, log in procs:
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{Path(log.name).name}").read_text()[-3000:]
        log.close()
    logs = [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]
    assert all("MULTI_CPU" in text and "Num processes: 2" in text for text in logs)
    digests = [text.split("LoRA weights digest ")[1].split()[0] for text in logs]
    assert "(process 0, equal on all 2)" in logs[0] and "(process 1, equal on all 2)" in logs[1]
    assert digests[0] == digests[1] == lora_digest(load_file(str(out / LORA)))  # one LoRA, the one written
    assert (out / "checkpoint-3" / "random_states_1.pkl").is_file() and not (out / LOCK_NAME).exists()
    rewards = [json.loads(line)["reward_by_process"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 3 and all(len(r) == 2 and r[0] != r[1] for r in rewards)  # both ranks trained


@pytest.mark.slow
def test_a_multi_machine_cpu_accelerate_config_is_refused_instead_of_two_lone_runs(tiny_sd_path, tmp_path):
    config = tmp_path / "multi_cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nmixed_precision: 'no'\n"
                      "num_machines: 2\nnum_processes: 2\nmachine_rank: 0\nmain_process_ip: 127.0.0.1\n"
                      "main_process_port: 29545\nuse_cpu: true\n")
    out = tmp_path / "out"
    result = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), SCRIPT,
                  *base_args(tiny_sd_path, out, "--max_train_steps", "1")])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("train_draftplus.py: error:")]
    assert len(errors) == 1 and "started one process here" in errors[0] and "torchrun --nnodes" in errors[0]
    assert not out.exists()
