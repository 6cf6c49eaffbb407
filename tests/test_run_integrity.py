"""Every file tells the truth: a resume continues the same run, --overwrite_output_dir leaves nothing of the
earlier run, validation is one series, damaged checkpoints and hub typos are one line, and the files a
run writes say what they are.

One short real run (the `trained` fixture: 2 steps, a checkpoint each step, validation) is what the resume
checks are made against, in this process (`parse_args` runs every check before any model loads); the
behaviours that need the trainer to run again (a meant objective change, --overwrite_output_dir) run it.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_draftplus.py")
LORA, KOHYA = "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"


def base_args(model, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--reward", "redness", "--prompts", "animals",
            "--resolution", "32", "--num_inference_steps", "3", "--guidance_scale", "3", "--rank", "4",
            "--learning_rate", "1e-2", "--output_dir", str(out), "--report_to", "none", "--kl_coeff", "0.1", *extra]


VALIDATION = ["--validation_prompts", "a cat", "--num_validation_images", "2"]


def run(cmd, **env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def one_error(capsys, args):
    """`parse_args(args)` must exit 2 with one line; returns that line."""
    import train_draftplus

    with pytest.raises(SystemExit) as exit_info:
        train_draftplus.parse_args(args)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("train_draftplus.py: error:"), lines
    return lines[0]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_sd_path, tmp_path_factory):
    """A finished 2-step run with checkpoint-1, checkpoint-2 and validation; copy it before changing it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run([sys.executable, SCRIPT, *base_args(tiny_sd_path, out, "--max_train_steps", "2",
                                                     "--checkpointing_steps", "1", *VALIDATION)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.fixture
def previous(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    return out


# ----------------------------------------------------------------------------------------------
# A resume continues the same run
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_resume_with_another_objective_is_refused_naming_every_difference(tiny_sd_path, previous, capsys):
    error = one_error(capsys, base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                        "--max_train_steps", "4", "--kl_coeff", "0.5", "--reward", "brightness",
                                        *VALIDATION))
    assert "checkpoint-2 was trained for another objective (--reward redness -> brightness, --kl_coeff 0.1 -> 0.5)" \
        in error and "--allow_objective_change" in error
    for extra, named in ((["--reward", "color", "--reward_options", "target=blue"], "--reward redness -> color, "
                                                                                    "--reward_options (none) -> target=blue"),
                         (["--prompts", str(ROOT / "assets" / "toy" / "prompts.txt")], "--prompts animals -> "),
                         (["--num_inference_steps", "4"], "--num_inference_steps 3 -> 4"),
                         (["--resolution", "64"], "--height 32 -> 64, --width 32 -> 64"),
                         (["--negative_prompt", "blurry"], '--negative_prompt "" -> blurry'),
                         (["--scheduler", "euler"], "--scheduler ddim -> euler")):
        error = one_error(capsys, base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                            "--max_train_steps", "4", *extra))
        assert named in error, (extra, error)
    # the optimiser's settings are no part of the objective: a resume may tune them
    import train_draftplus

    args = train_draftplus.parse_args(base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                                "--max_train_steps", "4", "--learning_rate", "1e-3", *VALIDATION))
    assert args.checked.first_step == 2 and args.checked.objective_changes == ()


def test_a_resumed_max_train_steps_below_the_checkpoint_is_refused(tiny_sd_path, previous, capsys):
    error = one_error(capsys, base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                        "--max_train_steps", "1", *VALIDATION))
    assert "--max_train_steps 1 is below the step of" in error and "checkpoint-2" in error and "(2)" in error


@pytest.mark.slow
def test_a_meant_objective_change_is_recorded_in_metrics_checkpoints_and_card(tiny_sd_path, previous):
    result = run([sys.executable, SCRIPT, *base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                                     "--max_train_steps", "3", "--checkpointing_steps", "1",
                                                     "--reward", "brightness", "--kl_coeff", "0.5",
                                                     "--allow_objective_change", "--no_kohya_export")])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(previous)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "objective_change" not in rows[1]
    assert rows[2]["objective_change"] == {"--reward": ["redness", "brightness"], "--kl_coeff": [0.1, 0.5]}
    recorded = json.loads((previous / "checkpoint-3" / "draftplus_run.json").read_text())
    assert recorded["objective"]["reward"] == "brightness" and recorded["objective"]["kl_coeff"] == 0.5
    assert recorded["objective_changes"] == [{"from_step": 3, "changes": rows[2]["objective_change"]}]
    card = (previous / "README.md").read_text()
    assert "from step 3: --reward redness -> brightness, --kl_coeff 0.1 -> 0.5" in card
    assert "| objective from step 3 | --reward redness -> brightness, --kl_coeff 0.1 -> 0.5 |" in card
    # resumed again with the new objective: the history carries over, nothing new is recorded
    import train_draftplus

    args = train_draftplus.parse_args(base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                                "--max_train_steps", "5", "--reward", "brightness", "--kl_coeff",
                                                "0.5"))
    assert args.checked.objective_changes == tuple(recorded["objective_changes"])
    assert args.checked.objective_change is None


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damaged", ["optimizer.bin", LORA, "random_states_0.pkl"])
def test_a_damaged_newest_checkpoint_names_the_newest_intact_one(damaged, tiny_sd_path, previous, capsys):
    path = previous / "checkpoint-2" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # cut short, as by a crash during a copy
    error = one_error(capsys, base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                        "--max_train_steps", "4", *VALIDATION))
    assert f"checkpoint-2 is damaged ({damaged}: cut short" in error
    assert f"resume from the newest intact one with --resume_from_checkpoint {previous / 'checkpoint-1'}" in error
    import train_draftplus

    args = train_draftplus.parse_args(base_args(tiny_sd_path, previous, "--resume_from_checkpoint",
                                                str(previous / "checkpoint-1"), "--max_train_steps", "4", *VALIDATION))
    assert args.checked.first_step == 1  # the named one is accepted
    (previous / "checkpoint-1" / LORA).write_bytes(b"")
    error = one_error(capsys, base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                        "--max_train_steps", "4", *VALIDATION))
    assert "no earlier checkpoint is intact; start over with --overwrite_output_dir" in error


# ----------------------------------------------------------------------------------------------
# Validation is one series
# ----------------------------------------------------------------------------------------------
def test_validation_prompts_changed_on_resume_are_refused_unless_meant(tiny_sd_path, previous, capsys):
    other = ["--validation_prompts", "a dog", "--num_validation_images", "2"]
    error = one_error(capsys, base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                        "--max_train_steps", "4", *other))
    assert "validation.jsonl in --output_dir was rendered with other settings (--validation_prompts ['a cat'] -> " \
           "['a dog'])" in error and "--allow_objective_change" in error
    import train_draftplus

    train_draftplus.parse_args(base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                         "--max_train_steps", "4", "--allow_objective_change", *other))


@pytest.mark.slow
def test_resumes_keep_one_base_row_and_a_meant_change_starts_the_series_anew(tiny_sd_path, previous):
    def rows():
        return [json.loads(line) for line in (previous / "validation.jsonl").read_text().splitlines()]

    before = rows()
    assert [(r["phase"], r["step"]) for r in before] == [("base", 0), ("lora", 2)]
    assert before[0]["settings"]["prompts"] == ["a cat"]
    for steps in ("3", "4"):
        result = run([sys.executable, SCRIPT, *base_args(tiny_sd_path, previous, "--resume_from_checkpoint", "latest",
                                                         "--max_train_steps", steps, "--checkpointing_steps", "1",
                                                         "--no_kohya_export", *VALIDATION)])
        assert result.returncode == 0, result.stderr[-3000:]
    assert [(r["phase"], r["step"]) for r in rows()] == [("base", 0), ("lora", 2), ("lora", 3), ("lora", 4)]
    assert rows()[0] == before[0]  # the base row is the first run's
    # a meant change of the validation prompts: a new series from the resumed step, the old one set aside
    result = run([sys.executable, SCRIPT, *base_args(tiny_sd_path, previous, "--resume_from_checkpoint",
                                                     str(previous / "checkpoint-3"), "--max_train_steps", "4",
                                                     "--no_kohya_export", "--allow_objective_change",
                                                     "--validation_prompts", "a dog", "--num_validation_images", "2")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(r["phase"], r["step"]) for r in rows()] == [("base", 0), ("lora", 4)]
    assert rows()[0]["settings"]["prompts"] == ["a dog"]
    earlier = [json.loads(line) for line in (previous / "validation-until-step-3.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in earlier] == [("base", 0), ("lora", 2), ("lora", 3), ("lora", 4)]


# ----------------------------------------------------------------------------------------------
# --overwrite_output_dir starts over
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_overwrite_removes_everything_the_earlier_run_derived(tiny_sd_path, previous):
    (previous / "notes.txt").write_text("mine")  # not the run's: kept
    earlier = {p.name for p in previous.iterdir()}
    assert {"validation.jsonl", "validation", "validation_before_after.png", "validation_reward.json",
            "training_curves.png", "README.md", LORA, KOHYA, "metrics.jsonl", "draftplus_settings.json"} <= earlier
    result = run([sys.executable, SCRIPT, *base_args(tiny_sd_path, previous, "--max_train_steps", "1",
                                                     "--checkpointing_steps", "5", "--overwrite_output_dir",
                                                     "--no_kohya_export")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in previous.iterdir()) == sorted(
        ["checkpoint-1", "metrics.jsonl", LORA, "draftplus_settings.json", "training_curves.png", "README.md",
         "notes.txt"])
    assert [r["step"] for r in metrics(previous)] == [1]
    assert "## Validation" not in (previous / "README.md").read_text()


def test_clear_previous_run_removes_the_derived_files_and_keeps_the_users(tmp_path):
    from utils.run.output_dir import clear_previous_run

    out = tmp_path / "run"
    derived = ["metrics.jsonl", "validation.jsonl", "validation-until-step-20.jsonl", "validation_before_after.png",
               "validation_reward.json", "training_curves.png", LORA, KOHYA, "draftplus_settings.json"]
    for name in derived:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old")
    (out / "validation").mkdir()
    (out / "validation" / "step-60.png").write_text("old")
    (out / "checkpoint-60").mkdir()
    (out / "README.md").write_text("---\ntags:\n- lora\n- draftplus\n---\n# the old run's card\n")
    (out / "notes.txt").write_text("mine")
    clear_previous_run(out, "logs")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "README.md").write_text("# my own notes, not a model card\n")  # not written by a run: kept
    clear_previous_run(out, "logs")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes.txt"]


def test_a_fresh_run_into_a_directory_with_only_derived_files_is_refused(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "validation.jsonl").write_text('{"step": 0, "phase": "base", "reward": 0.1}\n')
    error = one_error(capsys, base_args(tiny_sd_path, out, "--max_train_steps", "1"))
    assert "holds a previous run (validation.jsonl)" in error


# ----------------------------------------------------------------------------------------------
# One line instead of a traceback
# ----------------------------------------------------------------------------------------------
def test_a_model_id_typo_is_one_line_at_once_when_the_hub_says_404(tiny_sd_path, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    asked = []

    def not_found(self, repo_id, **kwargs):  # what HfApi.model_info raises for a repository that is not there
        from huggingface_hub.utils._http import httpx2

        asked.append(repo_id)
        url = f"https://huggingface.co/api/models/{repo_id}"
        raise RepositoryNotFoundError(f"404 Client Error. Repository Not Found for url: {url}",
                                      response=httpx2.Response(404, request=httpx2.Request("GET", url)))

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the hub is reachable; the stand-in answers 404
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", not_found)
    start = time.monotonic()
    error = one_error(capsys, base_args("stabilityai/stable-diffusion-xl-bsae-1.0", tmp_path / "out",
                                        "--max_train_steps", "1"))
    assert time.monotonic() - start < 10 and asked == ["stabilityai/stable-diffusion-xl-bsae-1.0"]
    assert "model 'stabilityai/stable-diffusion-xl-bsae-1.0' is not on the hub" in error and "check the id" in error
    assert not (tmp_path / "out").exists()


def accelerate_launch(*args):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs" / "cpu.yaml"), SCRIPT, *args]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the trainer through /proc")
@pytest.mark.parametrize("who", ["the trainer", "the process group (Ctrl-C)"])
def test_a_preempted_run_under_accelerate_launch_ends_without_a_traceback(who, tiny_sd_path, tmp_path):
    import signal

    out = tmp_path / "run"
    sig = signal.SIGTERM if who == "the trainer" else signal.SIGINT
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log", "w") as log:
        launcher = subprocess.Popen(accelerate_launch(*base_args(tiny_sd_path, out, "--max_train_steps", "5000",
                                                                 "--checkpointing_steps", "1000")),
                                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.05)
        trainer = int(Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()[0])
        if who == "the trainer":  # a scheduler signalling the training process
            os.kill(trainer, sig)
        else:  # Ctrl-C in a terminal reaches the launcher and the trainer
            os.killpg(launcher.pid, sig)
        status = launcher.wait(timeout=300)
        deadline = time.time() + 120
        while Path(f"/proc/{trainer}").exists() and time.time() < deadline:  # it may finish after the launcher
            time.sleep(0.05)
    output = (tmp_path / "log").read_text()
    assert status == -signal.SIGTERM, output[-3000:]  # the shell and a scheduler see 143, "terminated"
    assert "Traceback" not in output and "CalledProcessError" not in output, output[-3000:]
    stopped = int(output.split(f"Stopped by {sig.name} at step ")[1].split(";")[0])
    assert (out / f"checkpoint-{stopped}" / LORA).is_file() and not (out / ".draftplus.lock").exists()


# ----------------------------------------------------------------------------------------------
# What the files say
# ----------------------------------------------------------------------------------------------
def test_the_kohya_file_is_written_by_default_and_the_summary_gives_the_lora_files_sha256(trained):
    out, result = trained
    assert (out / KOHYA).is_file()
    digest = hashlib.sha256((out / LORA).read_bytes()).hexdigest()
    assert f"{out / LORA} (file sha256 {digest})" in result.stdout
    assert f"LoRA for ComfyUI and AUTOMATIC1111: {out / KOHYA}" in result.stdout
    # the digest that all ranks compare is named for what it is (a file's sha256 it is not)
    logged = re.search(r"LoRA weights digest ([0-9a-f]{64}) \(process 0, equal on all 1\): the sha256 of the "
                       r"weights' names and values, not of a file", result.stderr)
    assert logged and logged.group(1) != digest
    card = (out / "README.md").read_text()
    assert f"| `{KOHYA}` | ComfyUI" in card and "AUTOMATIC1111" in card


def test_the_before_after_grid_is_labelled(trained):
    from PIL import Image

    out, _ = trained
    grid = Image.open(out / "validation_before_after.png").convert("L")
    # 2 images of 32 px enlarged 8x, right of a label column that holds text
    assert grid.width > 2 * 256 and grid.height > 2 * 256
    label_column = grid.crop((0, 0, grid.width - 2 * 256 - 4, grid.height))
    assert min(label_column.getdata()) < 100
