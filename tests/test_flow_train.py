"""train_draftplus.py on the flow-matching families, as a user runs it: `accelerate launch` trains tiny SD3 and
FLUX.1-dev pipelines (SD3 with live validation, its grids, the ComfyUI file and the model card), the LoRA loads
into their diffusers pipelines at its alpha and changes the images, a resumed FLUX run ends where an
uninterrupted one does, a 2-process gloo run with `--compile` trains FLUX; and the defaults each family fills
in."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_draftplus.py")
SIZE = ["--height", "48", "--width", "32"]  # non-square; latents 24x16 with the tiny VAE (factor 2)


def base_args(model, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--reward", "redness", "--prompts", "animals", *SIZE,
            "--num_inference_steps", "3", "--max_sequence_length", "16", "--rank", "4", "--lora_alpha", "8",
            "--lora_target_modules", "attention+ff", "--learning_rate", "1e-2", "--kl_coeff", "0.5",
            "--output_dir", str(out), "--report_to", "none", *extra]


def accelerate_launch(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "accelerate_configs" / "cpu.yaml"), SCRIPT, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def render(pipe, **kwargs):
    with torch.no_grad():
        return pipe("a red circle", height=48, width=32, num_inference_steps=3, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images


def load_trained_lora(pipeline_class, model, lora_dir, guidance_scale):
    """Load the trained LoRA into the model's diffusers pipeline: it loads at base_args' rank 4 and alpha 8 and
    changes the images (same prompt and noise). Returns the names of its weights in the transformer."""
    pipe = pipeline_class.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe, guidance_scale=guidance_scale)
    pipe.load_lora_weights(lora_dir)
    config = next(iter(pipe.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)
    assert (render(pipe, guidance_scale=guidance_scale) - before).abs().max() > 1e-4
    return [name for name in pipe.transformer.state_dict() if "lora" in name]


@pytest.mark.slow
def test_sd3_trains_under_accelerate_launch_and_its_lora_loads_into_the_sd3_pipeline(tiny_sd3_path, tmp_path):
    """With live validation: the base and every step's grid, the before/after grid, the card's figures; and the
    ComfyUI file, written by default."""
    from utils.lora import COMFYUI_WEIGHTS_NAME

    out = tmp_path / "sd3"
    result = accelerate_launch(*base_args(tiny_sd3_path, out, "--max_train_steps", "2", "--checkpointing_steps", "2",
                                          "--guidance_scale", "4", "--negative_prompt", "a blue square",
                                          "--validation_prompts", "a red circle", "--num_validation_images", "2",
                                          "--validation_steps", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert metrics(out)[1]["kl_penalty"] > 0  # the LoRA moved away from the base after one update
    assert sorted(p.name for p in (out / "validation").glob("step-*.png")) == ["step-1.png", "step-2.png"]
    from PIL import Image

    assert Image.open(out / "validation" / "prompt-0.png").size == (2 * 32 * 5, 48 * 5)  # 2 images, enlarged 5x
    validation = json.loads((out / "validation_reward.json").read_text())
    assert validation["step"] == 2 and validation["before"] != validation["after"]
    assert (out / "validation_before_after.png").is_file()
    assert (out / COMFYUI_WEIGHTS_NAME).is_file() and f"LoRA for ComfyUI: {out / COMFYUI_WEIGHTS_NAME}" in result.stdout
    card = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline" in card and f"| `{COMFYUI_WEIGHTS_NAME}` | ComfyUI" in card
    assert f"| mean reward | {validation['before']:.4f} | {validation['after']:.4f} |" in card
    from diffusers import StableDiffusion3Pipeline

    lora_names = load_trained_lora(StableDiffusion3Pipeline, tiny_sd3_path, out, guidance_scale=4.0)
    assert any("ff_context.net.2" in name for name in lora_names)


@pytest.mark.slow
def test_flux_dev_trains_resumes_and_its_lora_loads_into_the_flux_pipeline(tiny_flux_dev_path, tmp_path):
    """Three steps straight; then the same run resumed from its checkpoint-2: the same step-3 metrics and LoRA."""
    straight = tmp_path / "straight"
    result = accelerate_launch(*base_args(tiny_flux_dev_path, straight, "--max_train_steps", "3",
                                          "--checkpointing_steps", "1", "--gradient_checkpointing"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in metrics(straight)] == [1, 2, 3]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                                   (straight / "metrics.jsonl").read_text().splitlines()[:2]))
    second = accelerate_launch(*base_args(tiny_flux_dev_path, resumed, "--max_train_steps", "3",
                                          "--checkpointing_steps", "1", "--gradient_checkpointing",
                                          "--resume_from_checkpoint", "latest"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "checkpoint-2" in second.stdout + second.stderr
    assert [m["step"] for m in metrics(resumed)] == [1, 2, 3]
    assert metrics(resumed)[2]["reward"] == pytest.approx(metrics(straight)[2]["reward"], rel=1e-5)
    assert metrics(resumed)[2]["kl_penalty"] == pytest.approx(metrics(straight)[2]["kl_penalty"], rel=1e-4)
    from safetensors.torch import load_file

    lora, lora_resumed = (load_file(d / "pytorch_lora_weights.safetensors") for d in (straight, resumed))
    assert lora.keys() == lora_resumed.keys()
    for key in lora:
        torch.testing.assert_close(lora_resumed[key], lora[key], rtol=1e-4, atol=1e-6)

    from diffusers import FluxPipeline

    lora_names = load_trained_lora(FluxPipeline, tiny_flux_dev_path, straight, guidance_scale=3.5)
    assert any("single_transformer_blocks.0.proj_out" in name for name in lora_names)
    assert not any(name.startswith("proj_out.") for name in lora_names)


@pytest.mark.parametrize("fixture,expected", [
    ("tiny_sd_path", {"scheduler": "ddim", "num_inference_steps": 50, "guidance_scale": 7.5,
                      "max_sequence_length": None, "true_cfg_scale": None}),
    ("tiny_sd3_path", {"scheduler": "model", "num_inference_steps": 28, "guidance_scale": 7.0,
                       "max_sequence_length": 256, "true_cfg_scale": None}),
    ("tiny_flux_dev_path", {"scheduler": "model", "num_inference_steps": 28, "guidance_scale": 3.5,
                            "max_sequence_length": 512, "true_cfg_scale": 1.0}),
    ("tiny_flux_schnell_path", {"scheduler": "model", "num_inference_steps": 4, "guidance_scale": 0.0,
                                "max_sequence_length": 256, "true_cfg_scale": 1.0}),
    ("tiny_qwen_image_path", {"scheduler": "model", "num_inference_steps": 50, "guidance_scale": 0.0,
                              "max_sequence_length": 512, "true_cfg_scale": 4.0}),
])
def test_each_family_fills_in_its_defaults(fixture, expected, request, tmp_path):
    import train_draftplus

    args = train_draftplus.parse_args(["--pretrained_model_name_or_path", str(request.getfixturevalue(fixture)),
                                       "--reward", "redness", "--resolution", "32", "--output_dir",
                                       str(tmp_path / "out"), "--report_to", "none"])
    assert {k: getattr(args, k) for k in expected} == expected
    options = {k: v for k, v in expected.items() if k in ("max_sequence_length", "true_cfg_scale") and v is not None}
    assert args.checked.family_options == options
    assert args.checked.scheduler == ("DDIMScheduler" if fixture == "tiny_sd_path" else "FlowMatchEulerDiscreteScheduler")


@pytest.mark.slow
def test_two_process_gloo_run_with_compile_trains_flux(tiny_flux_dev_path, tmp_path):
    """Real DDP over gloo, each rank with its own prompts and noise, the no-grad transformer calls compiled
    (`aot_eager`, as the compile tests): both ranks end with the same LoRA, which loads into FluxPipeline."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "DRAFTPLUS_COMPILE_BACKEND": "aot_eager"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29531", SCRIPT, *base_args(tiny_flux_dev_path, out, "--max_train_steps", "2",
                                                         "--checkpointing_steps", "2", "--compile")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MULTI_CPU" in result.stderr and "Num processes: 2" in result.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2]
    for m in metrics(out):
        first, second = m["reward_by_process"]
        assert abs(first - second) > 1e-6, m  # each rank drew its own prompts and noise
    assert metrics(out)[1]["kl_penalty"] > 0
    digests = {line.split("LoRA weights digest ")[1].split()[0] for line in result.stderr.splitlines()
               if "LoRA weights digest" in line}
    assert len(digests) == 1  # logged by both ranks, equal
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()

    from diffusers import FluxPipeline

    load_trained_lora(FluxPipeline, tiny_flux_dev_path, out, guidance_scale=3.5)
