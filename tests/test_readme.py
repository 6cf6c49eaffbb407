"""The README's commands run as printed, so they cannot go stale.

The shell blocks marked `<!-- runnable -->` (the quickstart's training command, as printed, and the
evaluator and export commands that follow it) run in order, in a copy of the repository, as a newcomer would
run them from its root; then the commands of the model card the quickstart wrote run too. Every other
command line of the trainer and the evaluator in the README (the GPU recipes) must parse. Slow: the real
quickstart and its evaluations take about 1-2 minutes on 2 cores (more on a busy machine).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.quickstart import code_blocks, commands, documentation

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
def repository_copy(destination: Path) -> Path:
    """The repository's files as a fresh clone holds them (tracked, and new ones git does not ignore)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def shell(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)  # the copy's own modules, from its root
    return subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1200)


def test_the_readme_marks_the_quickstart_runnable_and_its_test_command_is_what_ci_runs():
    blocks = code_blocks(documentation())
    runnable = [code for language, code, marked in blocks if marked]
    assert runnable and "train_draftplus.py" in runnable[0] and "--output_dir outputs/quickstart" in runnable[0]
    assert all(language == "bash" for language, _, marked in blocks if marked)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = code_blocks(README.read_text())
    (test_block,) = [code for language, code, _ in readme if language == "bash" and "pip install" in code
                     and "pytest" in code]
    install, run_tests = test_block.split(" && ")
    assert run_tests in ci  # `python -m pytest -q`, exactly
    assert any(line.endswith(install.removeprefix("pip install")) and "pip install" in line for line in ci)


def test_every_trainer_and_evaluator_command_in_the_readme_parses(monkeypatch):
    """The GPU recipes cannot run here; their options must exist and their values must parse."""
    import train_draftplus
    from utils.evaluation.cli import parse_args as evaluate_args
    from utils.run import arg_checks

    monkeypatch.setattr(arg_checks, "check_training_args", lambda args: None)  # no model, no hub: parsing only
    seen = {"train": 0, "evaluate": 0}
    for language, code, _ in code_blocks(documentation()):
        if language != "bash":
            continue
        for words in commands(code):
            if "train_draftplus.py" in words:
                train_draftplus.parse_args(words[words.index("train_draftplus.py") + 1:])
                seen["train"] += 1
            elif words[:3] == ["python", "-m", "utils.evaluation"] or words[1:4] == ["python", "-m", "utils.evaluation"]:
                evaluate_args(words[words.index("utils.evaluation") + 1:])
                seen["evaluate"] += 1
    assert seen["train"] >= 5 and seen["evaluate"] >= 2, seen


@pytest.mark.slow
def test_the_runnable_blocks_run_as_printed_in_a_fresh_copy_and_so_do_the_cards_commands(tmp_path):
    repo = repository_copy(tmp_path / "draftplus")
    printed = ""
    for _, code, marked in code_blocks(documentation()):
        if marked:
            result = shell(code, repo)
            assert result.returncode == 0, f"{code}\n{result.stderr[-3000:]}"
            printed += result.stdout
    assert "validation reward (8 images, fixed seeds)" in printed
    out = repo / "outputs" / "quickstart"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    # what the quickstart promises: fixed-seed images redder after training, the labelled grid, the card's figures
    validation = json.loads((out / "validation_reward.json").read_text())
    assert validation["after"] > validation["before"] + 0.03, validation
    from PIL import Image

    from utils.evaluation.image_grid import GridLayout

    labels = [f"{when}: {prompt}" for prompt in ("a blue circle", "a green square") for when in ("before",
                                                                                                "after 40 steps")]
    layout = GridLayout(labels, 4, (32 * 8, 32 * 8), "base model (before) and the LoRA (after), same seeds")
    assert Image.open(out / "validation_before_after.png").size == layout.size  # 4 labelled rows of 4, zoom 8
    assert f"| mean reward | {validation['before']:.4f} | {validation['after']:.4f} |" in (out / "README.md").read_text()
    assert (out / "checkpoint-20" / "pytorch_lora_weights_kohya.safetensors").is_file()
    rows = json.loads((repo / "outputs" / "eval" / "results.json").read_text())["results"]
    assert {"base", "quickstart", "quickstart@scale=0.5", "quickstart@aig=linear"} <= {r["model"] for r in rows}

    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card  # no path of this machine
    python_blocks = [code for language, code, _ in code_blocks(card) if language == "python"]
    load = python_blocks[0] + "\nimage.save('card-image.png')"
    result = subprocess.run([sys.executable, "-c", load], cwd=repo, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (evaluate,) = [code for language, code, _ in code_blocks(card) if language == "bash"]
    # as printed, plus what the card says offline needs, on fewer images
    result = shell(evaluate + " --diversity_metric lpips_random_backbone --max_prompts 2 --seeds_per_prompt 2", repo)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (repo / "outputs" / "quickstart-eval" / "results.json").is_file()
