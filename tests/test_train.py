"""train_draftplus.py as a user runs it: accelerate launch, checkpoints, resume, LoRA reload, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_draftplus.py")


def base_args(model, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--reward", "redness", "--prompts", "animals",
            "--resolution", "32", "--num_inference_steps", "3", "--guidance_scale", "3", "--rank", "4",
            "--lora_alpha", "8", "--learning_rate", "1e-2", "--output_dir", str(out), "--report_to", "none",
            *extra]


def run(cmd, env=None, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kw)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def accelerate_launch(*args):
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "accelerate_configs" / "cpu.yaml"), SCRIPT, *args])


@pytest.mark.slow
def test_accelerate_launch_checkpoints_resume_and_lora_reload(tiny_sd_path, tmp_path):
    out = tmp_path / "run"
    first = accelerate_launch(*base_args(tiny_sd_path, out, "--max_train_steps", "3", "--checkpointing_steps", "1",
                                         "--checkpoints_total_limit", "2", "--validation_prompts", "a cat",
                                         "--num_validation_images", "2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # rotated
    assert (out / "checkpoint-3" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "validation_before_after.png").is_file() and (out / "README.md").is_file()
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert all(set(m) >= {"loss", "reward", "kl_penalty", "grad_norm", "lr"} for m in metrics(out))

    # Resume from the newest checkpoint: continues at step 4, and the resumed run computes the same
    # step-4 metrics as an uninterrupted run (same prompts, same noise, same LoRA and optimizer state).
    second = accelerate_launch(*base_args(tiny_sd_path, out, "--max_train_steps", "4", "--checkpointing_steps", "1",
                                          "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stdout + second.stderr and "checkpoint-3" in second.stdout + second.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]

    straight = tmp_path / "straight"
    third = accelerate_launch(*base_args(tiny_sd_path, straight, "--max_train_steps", "4",
                                         "--checkpointing_steps", "10"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert metrics(straight)[3]["reward"] == pytest.approx(metrics(out)[3]["reward"], rel=1e-5)
    assert metrics(straight)[3]["kl_penalty"] == pytest.approx(metrics(out)[3]["kl_penalty"], rel=1e-4)

    # The LoRA loads into a plain diffusers pipeline, keeps alpha != rank, and changes the output.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="pt")
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(out)
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    config = next(iter(pipe.unet.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)
    assert (after - before).abs().max() > 1e-3


def run_quickstart(toy: str, kl_coeff: str, learning_rate: str, out) -> dict:
    """The README's quickstart on `toy` in short (20 steps): it exits 0, prints the validation reward and writes the
    labelled before/after grid; returns the validation rewards."""
    result = accelerate_launch("--pretrained_model_name_or_path", toy, "--reward", "redness", "--prompts",
                               str(ROOT / "assets" / toy / "prompts.txt"), "--resolution", "32",
                               "--num_inference_steps", "10", "--guidance_scale", "5", "--kl_coeff", kl_coeff,
                               "--learning_rate", learning_rate, "--train_batch_size", "4", "--max_train_steps", "20",
                               "--checkpointing_steps", "20", "--validation_prompts", "a blue circle",
                               "a green square", "--output_dir", str(out), "--report_to", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation reward (8 images, fixed seeds)" in result.stdout
    from PIL import Image

    from utils.evaluation.image_grid import GridLayout

    labels = [f"{when}: {prompt}" for prompt in ("a blue circle", "a green square") for when in ("before",
                                                                                                "after 20 steps")]
    layout = GridLayout(labels, 4, (32 * 8, 32 * 8), "base model (before) and the LoRA (after), same seeds")
    assert Image.open(out / "validation_before_after.png").size == layout.size  # 4 labelled rows of 4, zoom 8
    return json.loads((out / "validation_reward.json").read_text())


@pytest.mark.slow
def test_flow_quickstart_on_the_pretrained_flow_toy_raises_the_validation_reward(tmp_path):
    """The README's flow-matching demo in short: DRaFT+ on the committed SD3 toy makes fixed-seed images redder
    (its penalty compares velocity predictions, on a scale of its own: its kl_coeff is 33x smaller than the UNet toy's)."""
    out = tmp_path / "quickstart-flow"
    validation = run_quickstart("toy-flow", "0.0003", "5e-3", out)
    # committed toy, seed 0: -0.018 -> 0.253; an untrained LoRA leaves it where it is
    assert validation["after"] > validation["before"] + 0.1, validation
    assert (out / "pytorch_lora_weights_comfyui.safetensors").is_file()
    from diffusers import StableDiffusion3Pipeline

    assert "StableDiffusion3Pipeline" in (out / "README.md").read_text()
    # the LoRA loads into the diffusers pipeline and makes its images redder there too
    pipe = StableDiffusion3Pipeline.from_pretrained(ROOT / "assets" / "toy-flow")
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=10, guidance_scale=5.0, height=32, width=32, output_type="pt")

    def redness():
        images = pipe(["a green square"] * 2, generator=[torch.Generator().manual_seed(s) for s in (0, 3)],
                      **kwargs).images
        return float((images[:, 0] - (images[:, 1] + images[:, 2]) / 2).mean())

    before = redness()
    pipe.load_lora_weights(out)
    assert redness() > before + 0.1


@pytest.mark.slow
def test_sdxl_trains_under_accelerate_launch_and_its_lora_loads_into_the_sdxl_pipeline(tiny_sdxl_path, tmp_path):
    out = tmp_path / "sdxl"
    result = accelerate_launch(*base_args(tiny_sdxl_path, out, "--max_train_steps", "2", "--checkpointing_steps", "2",
                                          "--scheduler", "model", "--kl_coeff", "0.1",
                                          "--lora_target_modules", "attention+ff",
                                          "--validation_prompts", "a cat", "--num_validation_images", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == [1, 2] and all(m["kl_penalty"] >= 0 for m in metrics(out))
    assert "StableDiffusionXLPipeline" in (out / "README.md").read_text()
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    kwargs = dict(num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(out)
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert any("ff.net.2" in name for name in pipe.unet.state_dict() if "lora" in name)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.slow
def test_non_square_run_writes_non_square_validation_images(tiny_sd_path, tmp_path):
    out = tmp_path / "wide"
    result = accelerate_launch(*base_args(tiny_sd_path, out, "--max_train_steps", "1", "--height", "32", "--width",
                                          "48", "--validation_prompts", "a cat", "--num_validation_images", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    from utils.evaluation.image_grid import GridLayout

    zoom = 256 // 48
    # rows "before" and "after", 2 images each, 48 wide and 32 high, enlarged by `zoom`
    layout = GridLayout(["before: a cat", "after 1 step: a cat"], 2, (48 * zoom, 32 * zoom),
                        "base model (before) and the LoRA (after), same seeds")
    assert Image.open(out / "validation_before_after.png").size == layout.size


def tiny_clip_dir(path):
    """A tiny random CLIP with a CLIP-like processor, loadable wherever a PickScore/CLIP model is."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from utils.toys.tiny_models import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(path)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return path


@pytest.mark.slow
def test_two_process_gloo_run_with_model_and_custom_rewards(tiny_sd_path, tmp_path):
    """A real 2-process data-parallel run (DDP over gloo) against a weighted sum of a model-backed
    reward (PickScore code path, tiny offline CLIP) and a custom reward loaded from a file."""
    out = tmp_path / "ddp"
    custom = tmp_path / "my_reward.py"
    custom.write_text("def blueness(images, prompts):\n    return images[:, 2].mean(dim=(1, 2))\n")
    clip = tiny_clip_dir(tmp_path / "clip")
    reward = f"pickscore=0.01,{custom}:blueness=1.0"
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                  SCRIPT, *base_args(tiny_sd_path, out, "--max_train_steps", "2", "--gradient_accumulation_steps",
                                     "2", "--truncation_steps", "2", "--checkpointing_steps", "2"),
                  "--reward", reward, "--reward_options", f"pickscore.model={clip}"],
                 env={"ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MULTI_CPU" in result.stderr and "Num processes: 2" in result.stderr
    # ranks drew different prompts and noise (their rewards differ at every step), yet the end-of-run
    # check found identical LoRA weights on both
    assert [m["step"] for m in metrics(out)] == [1, 2]
    for m in metrics(out):
        first, second = m["reward_by_process"]
        assert abs(first - second) > 1e-6, m
        assert m["reward"] == pytest.approx((first + second) / 2, rel=1e-5)
    assert (out / "checkpoint-2" / "random_states_1.pkl").is_file()  # the second rank saved its RNG
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_push_to_hub_uploads_lora_not_checkpoints_and_never_writes_the_token(tiny_sd_path, tmp_path):
    out = tmp_path / "hub"
    calls = tmp_path / "calls.json"
    token = "hf_SECRETtoken1234567890"
    # Stand-in for the hub: record what would be created and uploaded.
    wrapper = tmp_path / "fake_hub_run.py"
    wrapper.write_text(f"""
import json, sys, huggingface_hub
from types import SimpleNamespace
log = []
huggingface_hub.create_repo = lambda **kw: (log.append(("create", kw)), SimpleNamespace(repo_id="me/" + kw["repo_id"]))[1]
huggingface_hub.upload_folder = lambda **kw: log.append(("upload", kw))
sys.argv = ["train_draftplus.py"] + sys.argv[1:]
import train_draftplus
train_draftplus.main(train_draftplus.parse_args())
json.dump(log, open({str(calls)!r}, "w"))
""")
    # HF_HUB_OFFLINE=0: --push_to_hub is refused offline; the wrapper above stands in for the hub
    result = run([sys.executable, str(wrapper), *base_args(tiny_sd_path, out, "--max_train_steps", "2",
                                                           "--checkpointing_steps", "1", "--validation_steps", "1",
                                                           "--validation_prompts", "a cat", "--num_validation_images",
                                                           "2", "--export_kohya", "--push_to_hub", "--hub_token",
                                                           token, "--report_to", "tensorboard")],
                 env={"HF_HUB_OFFLINE": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    log = json.loads(calls.read_text())
    (create, create_kw), (upload, upload_kw) = log
    assert create == "create" and create_kw["repo_id"] == "hub"
    assert upload == "upload" and upload_kw["repo_id"] == "me/hub" and upload_kw["folder_path"] == str(out)
    # what huggingface_hub would upload from the folder with these patterns
    from huggingface_hub.utils import filter_repo_objects

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    uploaded = set(filter_repo_objects(files, allow_patterns=upload_kw["allow_patterns"],
                                       ignore_patterns=upload_kw["ignore_patterns"]))
    assert uploaded == {"README.md", "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
                        "draftplus_settings.json",
                        "validation/step-1.png", "validation/step-2.png", "validation/prompt-0.png",
                        "validation_before_after.png", "training_curves.png"}
    assert any(f.startswith("checkpoint-") for f in files) and any(f.startswith("logs/") for f in files)
    from huggingface_hub import ModelCard

    text = (out / "README.md").read_text()
    card = ModelCard(text)
    assert "TODO" not in text and "More Information Needed" not in text
    assert card.data.base_model is None  # a local directory is no hub id
    assert card.data.widget == [{"text": "a cat", "output": {"url": "validation/prompt-0.png"}}]
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert token not in result.stdout + result.stderr


@pytest.mark.slow
def test_help_documents_every_option_and_reward_help_lists_rewards(capsys):
    result = run([sys.executable, SCRIPT, "--help"])
    assert result.returncode == 0
    for option in ("--kl_coeff", "--truncation_steps", "--lv_samples", "--reward", "--resume_from_checkpoint",
                   "--gradient_checkpointing", "--use_8bit_adam", "--hub_token", "--lora_target_modules"):
        assert option in result.stdout
    import train_draftplus  # the listing in this process: the script's entry point is exercised just above

    with pytest.raises(SystemExit) as exit_info:
        train_draftplus.parse_args(["--reward", "help"])
    listing = capsys.readouterr().out
    assert exit_info.value.code == 0 and "pickscore" in listing and "redness" in listing
