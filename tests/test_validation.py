"""Live validation (utils/run/validation.py), per-step metrics and the training curves."""

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from utils.run.validation import Validation, comparison_grid, read_validation_log

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_draftplus.py")


class FakeAccelerator:
    """What Validation uses of accelerate's Accelerator, recording what is logged."""

    device = torch.device("cpu")
    trackers = ()

    def __init__(self, is_main_process=True):
        self.logged = []
        self.is_main_process = is_main_process

    def autocast(self):
        return nullcontext()

    def log(self, values, step):
        self.logged.append((step, values))


@pytest.fixture
def validation_setup(tiny_sd_path, tmp_path):
    from diffusers import DDIMScheduler

    from rewards import build_reward
    from utils.families import load_family
    from utils.lora import add_lora
    from utils.rollout.loop import Models

    family = load_family(str(tiny_sd_path))
    add_lora(family.denoiser, rank=4)  # gaussian init: B = 0, so the LoRA is exactly the base model at first
    models = Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                    scheduler=DDIMScheduler.from_config(family.pipe.scheduler.config))
    args = SimpleNamespace(validation_prompts=["a red circle", "a blue square"], num_validation_images=3, seed=0,
                           negative_prompt="", num_inference_steps=3, guidance_scale=3.0, eta=0.0, height=32,
                           width=32, output_dir=str(tmp_path / "run"), validation_diversity="pixel_l2")
    accelerator = FakeAccelerator()
    return Validation(args, accelerator, models, build_reward("redness")), models, accelerator, args


def test_base_rendered_once_lora_from_the_same_noise_grid_and_log(validation_setup, monkeypatch):
    validation, models, accelerator, args = validation_setup
    renders = []
    real_render = Validation.render
    monkeypatch.setattr(Validation, "render", lambda self: renders.append(1) or real_render(self))

    base = validation.render_base()
    assert validation.render_base() is base and len(renders) == 1  # cached, not re-rendered
    assert base.images.shape == (6, 3, 32, 32) and base.rewards.shape == (6,)

    # B = 0: the LoRA is the base model, so the same noise must give the same images
    same = validation(1)
    assert torch.equal(same.images, base.images)
    # a trained LoRA renders different images, again from the base's noise
    with torch.no_grad():
        for name, p in models.raw_denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    trained = validation(2)
    assert validation(2) is trained and len(renders) == 3  # step 2 rendered once
    assert (trained.images - base.images).abs().max() > 0.01
    from rewards import build_reward

    assert torch.allclose(trained.rewards, build_reward("redness")(trained.images, ["x"] * 6), atol=1e-6)

    out = Path(args.output_dir)
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-1.png", "step-2.png"]
    log = read_validation_log(out)
    assert [(e["phase"], e["step"]) for e in log] == [("base", 0), ("lora", 1), ("lora", 2)]
    assert log[2]["reward"] == pytest.approx(float(trained.rewards.mean()))
    assert log[2]["rewards"] == pytest.approx(trained.rewards.tolist(), abs=1e-6)
    assert log[2]["diversity_metric"] == "pixel_l2" and log[2]["diversity"] > 0
    from utils.evaluation.diversity import Diversity

    expected = (Diversity("pixel_l2")(trained.images[:3]) + Diversity("pixel_l2")(trained.images[3:])) / 2
    assert log[2]["diversity"] == pytest.approx(expected)
    assert (0, {"validation_reward_base": log[0]["reward"], "validation_diversity_base": log[0]["diversity"]}) \
        in accelerator.logged
    assert any(step == 2 and values.get("validation_reward") == log[2]["reward"] for step, values in accelerator.logged)


def test_a_resumed_series_keeps_its_base_row_and_drops_what_lies_past_the_resumed_step(validation_setup):
    validation, models, accelerator, args = validation_setup
    validation.render_base()
    for step in (1, 2, 3):
        validation(step)
    out = Path(args.output_dir)
    assert [(e["phase"], e["step"]) for e in read_validation_log(out)] == [("base", 0), ("lora", 1), ("lora", 2),
                                                                           ("lora", 3)]
    lines_before = (out / "validation.jsonl").read_text().splitlines()

    # resumed from checkpoint-2: the step-3 row and grid go, the base row stays the only one
    resumed = Validation(args, FakeAccelerator(), models, validation.reward_fn, start_step=2)
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-1.png", "step-2.png"]
    base = resumed.render_base()
    assert base.diversity == pytest.approx(json.loads(lines_before[0])["diversity"])  # still known for the card
    resumed(3)
    lines = (out / "validation.jsonl").read_text().splitlines()
    assert lines[:3] == lines_before[:3] and [json.loads(line)["phase"] for line in lines].count("base") == 1
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]

    # other prompts (a resume allowed to change them): a new series, the old one set aside whole
    other = SimpleNamespace(**{**vars(args), "validation_prompts": ["a green circle"]})
    anew = Validation(other, FakeAccelerator(), models, validation.reward_fn, start_step=3)
    anew.render_base()
    assert [(e["phase"], e["step"], e["settings"]["prompts"]) for e in read_validation_log(out)] == [
        ("base", 0, ["a green circle"])]
    assert (out / "validation-until-step-3.jsonl").read_text().splitlines() == lines


def test_the_other_processes_of_a_sharded_run_render_what_the_main_one_renders_and_write_nothing(validation_setup):
    validation, models, accelerator, args = validation_setup
    out = Path(args.output_dir)
    main_base = validation.render_base()
    main_step = validation(2)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other_accelerator = FakeAccelerator(is_main_process=False)
    # resumed from step 1: the main process drops step 2's row and grid, another process must not
    other = Validation(args, other_accelerator, models, validation.reward_fn, start_step=1)
    assert other.diversity is None  # only the main process scores (and loads a model for) diversity
    assert torch.equal(other.render_base().images, main_base.images)
    rendered = other(2)
    assert torch.equal(rendered.images, main_step.images) and torch.equal(rendered.rewards, main_step.rewards)
    assert other(2) is rendered and other.latest == (2, rendered)  # the trainer's last render, kept for the end
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files and not other_accelerator.logged


def test_the_before_after_grid_labels_each_row_with_before_or_after_and_its_prompt(validation_setup, tmp_path):
    from utils.evaluation.image_grid import GridLayout, labelled_grid
    from utils.run.validation import before_after_rows

    validation, models, accelerator, args = validation_setup
    with torch.no_grad():
        for name, p in models.raw_denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    after = validation(7)
    validation.save_before_after(tmp_path / "grid.png")
    rows = before_after_rows(validation.prompts, validation.render_base(), after, 3, 7)
    assert [label for label, _ in rows] == ["before: a red circle", "after 7 steps: a red circle",
                                            "before: a blue square", "after 7 steps: a blue square"]
    assert all(torch.equal(a, b) for a, b in zip(rows[1][1], after.images[:3]))
    grid = Image.open(tmp_path / "grid.png")
    title = "base model (before) and the LoRA (after), same seeds"
    assert list(grid.getdata()) == list(labelled_grid(rows, title=title, min_side=256).getdata())
    layout = GridLayout([label for label, _ in rows], 3, (256, 256), title)
    for r in range(4):  # every row's label is drawn
        assert min(grid.crop(layout.label_box(r)).convert("L").getdata()) < 100


def test_comparison_grid_puts_base_left_lora_right_pixel_exact():
    from utils.run.validation import Rendered, tile_origin, to_pil

    torch.manual_seed(0)
    base = Rendered(torch.rand(4, 3, 32, 48), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    current = Rendered(torch.rand(4, 3, 32, 48), torch.tensor([0.5, 0.6, 0.7, 0.8]))
    grid = comparison_grid(["a", "b"], base, current, 2, "step 5")
    zoom = 256 // 48  # toy-sized images are enlarged (nearest neighbour)
    size = (48 * zoom, 32 * zoom)
    for side, rendered in enumerate((base, current)):
        for k in range(2):
            for j in range(2):
                left, top = tile_origin(side, k, j, size, 2)
                tile = grid.crop((left, top, left + size[0], top + size[1]))
                expected = to_pil(rendered.images[2 * k + j]).resize(size, resample=Image.NEAREST)
                assert list(tile.getdata()) == list(expected.getdata()), (side, k, j)
    assert tile_origin(1, 0, 0, size, 2)[0] > tile_origin(0, 0, 1, size, 2)[0] + size[0]  # LoRA right of base
    assert grid.size[0] >= tile_origin(1, 1, 1, size, 2)[0] + size[0]


def test_training_curves_from_metrics_and_validation_logs(tmp_path):
    from utils.run.plots import plot_training_curves, read_metrics

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3, 2, 3, 4):  # a resumed run repeats steps 2 and 3: the later lines win
            f.write(json.dumps({"step": step, "reward": step / 10, "kl_penalty": 0.01 * step, "reward_std": 0.1}) + "\n")
    with open(tmp_path / "validation.jsonl", "w") as f:
        for entry in ({"step": 0, "phase": "base", "reward": 0.1}, {"step": 2, "phase": "lora", "reward": 0.2},
                      {"step": 4, "phase": "lora", "reward": 0.3}, {"step": 0, "phase": "base", "reward": 0.1}):
            f.write(json.dumps(entry) + "\n")
        f.write('{"step": 6, "phase": "lo')  # a line cut short by a crash: skipped
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert [(e["phase"], e["step"]) for e in read_validation_log(tmp_path)] == [("base", 0), ("lora", 2), ("lora", 4)]
    path = plot_training_curves(tmp_path)
    assert path == tmp_path / "training_curves.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 2 * image.height
    assert plot_training_curves(tmp_path / "empty") is None


def run(cmd, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def train_args(model, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--reward", "redness=1,brightness=0.5", "--prompts",
            "animals", "--resolution", "32", "--num_inference_steps", "3", "--guidance_scale", "3", "--rank", "4",
            "--learning_rate", "1e-2", "--output_dir", str(out), *extra]


@pytest.mark.slow
def test_training_writes_grids_at_the_requested_steps_metrics_curves_and_kohya(tiny_sd_path, tmp_path):
    out = tmp_path / "run"
    result = run([sys.executable, SCRIPT, *train_args(
        tiny_sd_path, out, "--max_train_steps", "5", "--checkpointing_steps", "10", "--validation_steps", "2",
        "--validation_prompts", "a cat", "a dog", "--num_validation_images", "2", "--validation_diversity",
        "--report_to", "tensorboard")])
    assert result.returncode == 0, result.stderr[-3000:]
    # every 2 steps, and at the end
    assert sorted(p.name for p in (out / "validation").glob("step-*.png")) == ["step-2.png", "step-4.png",
                                                                               "step-5.png"]
    log = read_validation_log(out)
    assert [(e["phase"], e["step"]) for e in log] == [("base", 0), ("lora", 2), ("lora", 4), ("lora", 5)]
    # offline, no AlexNet weights: the bare flag falls back to the stand-in and says so in the log
    assert {e["diversity_metric"] for e in log} <= {"lpips", "lpips_random_backbone"}
    assert all(e["diversity"] >= 0 for e in log)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert m["reward_std"] >= 0 and m["images_per_s"] > 0
        assert m["reward"] == pytest.approx(m["reward/redness"] + 0.5 * m["reward/brightness"], abs=1e-5)
        assert "peak_memory_gib" not in m  # CPU run
    # the file ComfyUI and AUTOMATIC1111 load is written by default
    assert (out / "training_curves.png").is_file() and (out / "pytorch_lora_weights_kohya.safetensors").is_file()
    validation = json.loads((out / "validation_reward.json").read_text())
    assert validation["after"] == pytest.approx(log[-1]["reward"]) and validation["before"] == pytest.approx(
        log[0]["reward"])
    readme = (out / "README.md").read_text()
    assert "validation/step-5.png" in readme and "validation/prompt-1.png" in readme
    assert "training_curves.png" in readme and "pytorch_lora_weights_kohya.safetensors" in readme

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "draftplus"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("validation")] == [2, 4, 5]
    assert {"validation_reward", "reward_std", "images_per_s", "reward/redness"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize("extra, expected", [
    (["--validation_steps", "2"], "--validation_steps needs --validation_prompts"),
    (["--validation_steps", "-1", "--validation_prompts", "a cat"], "--validation_steps must be >= 0"),
    (["--validation_diversity", "--validation_prompts", "a cat", "--num_validation_images", "1"],
     "--num_validation_images must be >= 2"),
    (["--validation_diversity", "lpips", "--validation_prompts", "a cat"], "lpips_random_backbone"),
])
def test_bad_validation_flags_fail_fast_with_one_line(tiny_sd_path, tmp_path, extra, expected, monkeypatch, capsys):
    """Refused by the argument check, before any model loads (in-process: the entry point's one-line refusals under
    each launcher are tests/test_launchers.py's and tests/test_bad_input.py's)."""
    import train_draftplus

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no LPIPS weights to be found
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train_draftplus.parse_args(train_args(tiny_sd_path, out, "--max_train_steps", "1", *extra))
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train_draftplus.py: error:") and expected in lines[0], lines
    assert not out.exists()
