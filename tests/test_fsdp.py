"""`--shard` (FSDP2, utils/run/sharding.py) on CPU: two processes over gloo on the tiny FLUX.1-dev pipeline.

The sharded model predicts what the whole model predicts, with and without its LoRA (the DRaFT+ reference is the
adapters-off prediction), and its LoRA gradients, averaged over the processes, are those of the whole model; a
sharded run started by accelerate_configs/fsdp.yaml ends with the LoRA of the same DDP run, in the same files,
and with its validation images (rendered by both ranks in step, written once); a SIGTERM to one rank then a
resume ends bitwise where an uninterrupted sharded run ends, its validation series continued; non-finite steps on
one rank are skipped by all; the LoRA loads into FluxPipeline and the evaluator. Each family that shards names block
classes its denoiser has; what cannot be sharded is refused with one line before any model loads.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from utils.families import FAMILIES
from utils.lora import LORA_WEIGHTS_NAME
from utils.run.sharding import shard_problem

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_draftplus.py")
SIZE = ["--height", "48", "--width", "32"]  # latents 24x16 with the tiny VAE (factor 2)


def env_with(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "ACCELERATE_USE_CPU": "true", **extra}


# ----------------------------------------------------------------------------------------------
# The families' block classes, and the refusals
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_sd3_path", "tiny_flux_dev_path"])
def test_the_named_block_classes_cover_every_transformer_block_of_the_denoiser(fixture, request):
    from utils.families import load_family

    family = load_family(str(request.getfixturevalue(fixture)))
    assert family.shard_block_classes
    stacks = [(name, m) for name, m in family.denoiser.named_children()
              if isinstance(m, torch.nn.ModuleList) and name.endswith("blocks")]
    assert stacks  # the blocks are what holds the weights: every one of them is a shard unit
    for name, stack in stacks:
        assert {type(block).__name__ for block in stack} <= set(family.shard_block_classes), name
    in_blocks = sum(p.numel() for _, stack in stacks for p in stack.parameters())
    assert in_blocks > 0.5 * sum(p.numel() for p in family.denoiser.parameters())


def shard_args(**overrides):
    args = {"shard": True, "mixed_precision": None, "quantize_base": None, "compile": False,
            "validation_prompts": []}
    return argparse.Namespace(**{**args, **overrides})


def flux():
    return next(f for f in FAMILIES if f.name == "flux")


@pytest.mark.parametrize("overrides, world, expected", [
    ({}, 1, "splits the frozen model across processes and this run has one"),
    ({"mixed_precision": "fp16"}, 2, "--mixed_precision fp16 does not go with --shard: use bf16"),
    ({"quantize_base": "nf4"}, 2, "--quantize_base does not go with --shard"),
    ({"compile": True}, 2, "--compile does not go with --shard"),
])
def test_what_a_sharded_run_cannot_do_is_refused(overrides, world, expected):
    assert expected in shard_problem(shard_args(**overrides), flux(), world, env={})


def test_a_sharded_run_may_validate():  # every rank renders the validation (tests below)
    assert shard_problem(shard_args(validation_prompts=["a cat"]), flux(), 2, env={}) is None


def test_an_accelerate_fsdp_config_turns_sharding_on_and_unet_families_are_refused():
    args = shard_args(shard=False)
    assert shard_problem(args, flux(), 2, env={}) is None and args.shard is False
    assert shard_problem(args, flux(), 2, env={"ACCELERATE_USE_FSDP": "true"}) is None and args.shard is True
    unets = [f for f in FAMILIES if not f.shard_block_classes]
    assert unets and all("train them with DDP" in shard_problem(shard_args(), f, 2, env={}) for f in unets)


def test_the_fsdp_plugin_can_keep_gathered_blocks_until_the_backward():
    from types import SimpleNamespace

    from utils.run.sharding import reshard_after_forward

    def accelerator(**plugin):
        return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(**plugin)))

    assert reshard_after_forward(accelerator(reshard_after_forward=False)) is False
    assert reshard_after_forward(accelerator(reshard_after_forward=True)) is True
    assert reshard_after_forward(SimpleNamespace(state=SimpleNamespace())) is True  # no plugin: --shard


def test_the_command_line_refuses_shard_in_one_line_before_loading(tiny_sd_path, tmp_path, monkeypatch, capsys):
    import train_draftplus

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(SystemExit) as exit_info:
        train_draftplus.parse_args(["--pretrained_model_name_or_path", str(tiny_sd_path), "--reward", "redness",
                                    "--resolution", "32", "--output_dir", str(tmp_path / "out"), "--report_to",
                                    "none", "--shard"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--shard: StableDiffusionPipeline models fit one GPU whole" in lines[0], lines
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# The sharded model against the whole one, two processes
# ----------------------------------------------------------------------------------------------
WORKER = r'''
import copy, json, sys
import torch, torch.distributed as dist
from utils.families import load_family
from utils.lora import add_lora, adapters_disabled
from utils.run.sharding import largest, shard_models

model, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
family = load_family(model, max_sequence_length=16)
whole_base = copy.deepcopy(family.denoiser)  # never gets a LoRA: what the reference must be
targets = family.target_modules(["attention+ff"], dict(family.denoiser.config))
lora = add_lora(family.denoiser, 4, 8, 0.0, targets)
with torch.no_grad():  # a trained-looking LoRA (PEFT starts B at zero), the same on every process
    for p in lora:
        p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
whole = copy.deepcopy(family.denoiser)
family.denoiser.enable_gradient_checkpointing()

generator = torch.Generator().manual_seed(1 + rank)  # each process its own latents and prompt
x = torch.randn(family.latent_shape(1, 48, 32), generator=generator)
t = torch.tensor([700.0])
prompt = ["a red cat" if rank == 0 else "a small blue dog"]
cond = family.encode_prompts(prompt)

sharded = shard_models(family, lora, torch.device("cpu"))
result = {"blocks": sharded.blocks, "lora_is_plain": all(type(p) is torch.nn.Parameter for p in lora),
          "base_is_dtensor": type(family.denoiser.x_embedder.weight).__name__ == "DTensor",
          "encoder_is_dtensor": all(type(p).__name__ == "DTensor"
                                    for p in largest(family.text_encoders).parameters())}
sharded_cond = family.encode_prompts(prompt)  # with the largest text encoder sharded
result["embeds"] = max((sharded_cond.cond[k] - cond.cond[k]).abs().max().item() for k in cond.cond)

with torch.no_grad(), adapters_disabled(family.denoiser):
    reference = family.predict(family.denoiser, x, t, cond, 3.5)
with torch.no_grad():
    base = family.predict(whole_base, x, t, cond, 3.5)
result["reference_vs_base"] = (reference - base).abs().max().item()

prediction = family.predict(family.denoiser, x, t, cond, 3.5)
expected = family.predict(whole, x, t, cond, 3.5)
result["prediction_vs_whole"] = (prediction - expected).abs().max().item()
result["lora_effect"] = (prediction - reference).abs().max().item()

prediction.square().mean().backward()
sharded.average_gradients()
expected.square().mean().backward()
whole_grads = [p.grad for p in whole.parameters() if p.requires_grad]
for g in whole_grads:  # the mean over the processes, by hand
    dist.all_reduce(g)
    g /= world
result["grads_vs_whole"] = max((p.grad - g).abs().max().item() for p, g in zip(lora, whole_grads))
result["grad_scale"] = max(g.abs().max().item() for g in whole_grads)
json.dump(result, open(f"{out}/rank{rank}.json", "w"))
'''


@pytest.mark.slow
def test_the_sharded_model_predicts_references_and_backpropagates_as_the_whole_model(tiny_flux_dev_path, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29571", str(worker), str(tiny_flux_dev_path), str(tmp_path)],
                            cwd=ROOT, env=env_with(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert r["blocks"] > 0 and r["lora_is_plain"] and r["base_is_dtensor"] and r["encoder_is_dtensor"], r
        assert r["embeds"] <= 1e-6, r
        assert r["reference_vs_base"] <= 1e-5 and r["prediction_vs_whole"] <= 1e-5, r
        assert r["lora_effect"] > 1e-2, r  # the LoRA matters, so the reference being the base is not vacuous
        assert r["grads_vs_whole"] <= 1e-6 * max(1.0, r["grad_scale"]) and r["grad_scale"] > 0, r


# ----------------------------------------------------------------------------------------------
# Training runs: the FSDP run against the DDP run, preemption and resume
# ----------------------------------------------------------------------------------------------
# The redness reward; on rank 1 only (what one node sees): a SIGTERM (a preemption notice) on the TERM_AT-th
# call, and NaN from the NAN_FROM-th call on.
REWARD = """
import os
import signal

CALLS = [0]


def red(images, prompts):
    CALLS[0] += 1
    rank1 = os.environ.get("RANK") == "1"
    if rank1 and CALLS[0] == int(os.environ.get("TERM_AT", "0")):
        os.kill(os.getpid(), signal.SIGTERM)
    score = images[:, 0].mean(dim=(1, 2))
    return score * float("nan") if rank1 and CALLS[0] >= int(os.environ.get("NAN_FROM", "1000000")) else score
"""
STEPS = 4
# Validation before training, at step 2 and at the end (step 4): one reward call per prompt each, on every rank.
VALIDATE = ["--validation_prompts", "a red circle", "--num_validation_images", "2", "--validation_steps", "2"]


def train_args(model, out, reward, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--reward", f"{reward}:red", "--prompts", "animals", *SIZE,
            "--num_inference_steps", "3", "--max_sequence_length", "16", "--rank", "4", "--lora_alpha", "8",
            "--lora_target_modules", "attention+ff", "--learning_rate", "1e-2", "--kl_coeff", "0.5",
            "--truncation_steps", "2", "--gradient_accumulation_steps", "2", "--gradient_checkpointing",
            "--max_train_steps", str(STEPS), "--checkpointing_steps", "2", "--output_dir", str(out),
            "--report_to", "none", *extra]


def fsdp_launch(model, out, reward, port, *extra, **env):
    """Two CPU processes started by `accelerate launch` with accelerate_configs/fsdp.yaml (no --shard flag)."""
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2",
                           "--main_process_port", str(port), "--mixed_precision", "no", SCRIPT,
                           *train_args(model, out, reward, *extra)],
                          cwd=ROOT, env=env_with(**env), capture_output=True, text=True, timeout=600)


def ddp_launch(model, out, reward, port, *extra):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), SCRIPT, *train_args(model, out, reward, *extra)],
                          cwd=ROOT, env=env_with(), capture_output=True, text=True, timeout=600)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def max_abs_difference(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def lora_metadata(path):
    """The LoRA file's metadata; lists sorted (PEFT keeps target_modules as a set: its order is the process's)."""
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata())
    config = json.loads(metadata.pop("lora_adapter_metadata"))
    return metadata, {k: sorted(v) if isinstance(v, list) else v for k, v in config.items()}


def validation_rows(out):
    """validation.jsonl's rows as written (a second writer would add a second base row)."""
    return [json.loads(line) for line in (Path(out) / "validation.jsonl").read_text().splitlines()]


def pixels(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def validation_tiles(grid, per_prompt=2):
    """The images of a one-prompt `validation/step-N.png` (base then LoRA), as pixels, without the rewards
    written under them (their last digit may round either way between two runs equal within float tolerance)."""
    from utils.run.validation import tile_origin

    w, h = 32 * 5, 48 * 5  # 32x48 images, enlarged 256 // 48 = 5 times (`_tile`)
    image = pixels(grid)
    return [image[top:top + h, left:left + w] for side in (0, 1) for j in range(per_prompt)
            for left, top in [tile_origin(side, 0, j, (w, h), per_prompt)]]


@pytest.fixture(scope="module")
def fsdp_run(tiny_flux_dev_path, tmp_path_factory):
    """An uninterrupted sharded run of STEPS steps, validating; its directory and its log."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "reward.py").write_text(REWARD)
    result = fsdp_launch(tiny_flux_dev_path, root / "straight", root / "reward.py", 29573, *VALIDATE)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, result.stderr


@pytest.mark.slow
def test_the_fsdp_run_ends_with_the_lora_of_the_ddp_run_in_the_same_files(fsdp_run, tiny_flux_dev_path):
    root, log = fsdp_run
    straight, ddp = root / "straight", root / "ddp"
    result = ddp_launch(tiny_flux_dev_path, ddp, root / "reward.py", 29575, *VALIDATE)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP2-wrapped" in log and "FSDP2-wrapped" not in result.stderr  # the sharded path ran, and only there
    assert [m["step"] for m in metrics(straight)] == list(range(1, STEPS + 1))
    for a, b in zip(metrics(straight), metrics(ddp)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["kl_penalty"] == pytest.approx(b["kl_penalty"], rel=1e-4, abs=1e-9)
    assert metrics(straight)[-1]["kl_penalty"] > 0
    assert max_abs_difference(straight / LORA_WEIGHTS_NAME, ddp / LORA_WEIGHTS_NAME) <= 1e-6
    assert max_abs_difference(straight / "checkpoint-2" / LORA_WEIGHTS_NAME, straight / LORA_WEIGHTS_NAME) > 1e-4
    assert lora_metadata(straight / LORA_WEIGHTS_NAME) == lora_metadata(ddp / LORA_WEIGHTS_NAME)
    for step in (2, STEPS):  # a checkpoint holds what a DDP checkpoint holds
        assert {p.name for p in (straight / f"checkpoint-{step}").iterdir()} == \
               {p.name for p in (ddp / f"checkpoint-{step}").iterdir()}
    digests = {line.split("LoRA weights digest ")[1].split()[0] for line in log.splitlines() if "weights digest" in line}
    assert len(digests) == 1

    # Validation: the same rows, written once, and the same images within one 8-bit level, as the DDP run's.
    rows, ddp_rows = validation_rows(straight), validation_rows(ddp)
    assert [(r["phase"], r["step"]) for r in rows] == [("base", 0), ("lora", 2), ("lora", STEPS)]
    assert [(r["phase"], r["step"]) for r in ddp_rows] == [(r["phase"], r["step"]) for r in rows]
    for a, b in zip(rows, ddp_rows):
        assert a["rewards"] == pytest.approx(b["rewards"], abs=1e-5), (a, b)
    assert abs(rows[-1]["reward"] - rows[0]["reward"]) > 1e-4  # the trained LoRA renders other images
    for grid in ("step-2.png", f"step-{STEPS}.png"):
        for a, b in zip(validation_tiles(straight / "validation" / grid), validation_tiles(ddp / "validation" / grid)):
            assert abs(a - b).max() <= 1, grid
    for name in ("validation/prompt-0.png", "validation_before_after.png"):
        assert abs(pixels(straight / name) - pixels(ddp / name)).max() <= 1, name
    assert sorted(p.name for p in (straight / "validation").iterdir()) == \
           sorted(p.name for p in (ddp / "validation").iterdir())
    summary = json.loads((straight / "validation_reward.json").read_text())
    assert summary["after"] == pytest.approx(rows[-1]["reward"]) and "validation/step-4.png" in \
           (straight / "README.md").read_text()

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux_dev_path)
    pipe.set_progress_bar_config(disable=True)

    def render():
        with torch.no_grad():
            return pipe("a red circle", height=48, width=32, num_inference_steps=3, max_sequence_length=16,
                        generator=torch.Generator().manual_seed(0), output_type="pt").images

    before = render()
    pipe.load_lora_weights(straight)
    assert (render() - before).abs().max() > 1e-4

    from utils.evaluation import evaluate as ev

    result = ev.evaluate(str(tiny_flux_dev_path), ["a red circle", "a blue square"], reward="redness",
                         loras=[straight], diversity_metric="pixel_l2", device="cpu", num_inference_steps=3,
                         guidance_scale=3.5, height=48, width=32, seeds_per_prompt=2)
    base, lora = result.rows
    assert lora["path"] == str(straight) and abs(lora["reward_mean"] - base["reward_mean"]) > 1e-6


@pytest.mark.slow
def test_a_sigterm_to_one_rank_then_resume_ends_bitwise_where_the_uninterrupted_run_ends(fsdp_run,
                                                                                      tiny_flux_dev_path):
    root, _ = fsdp_run
    out = root / "preempted"
    # Rank 1's 7th reward call is in step 3 (1 for the base validation, 2 micro-steps a step, 1 for the validation
    # at step 2): all ranks stop after step 3, with a checkpoint.
    stopped = fsdp_launch(tiny_flux_dev_path, out, root / "reward.py", 29577, *VALIDATE, TERM_AT="7")
    assert stopped.returncode != 0 and "Stopped by SIGTERM at step 3;" in stopped.stdout, stopped.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not (out / LORA_WEIGHTS_NAME).exists()
    assert [(r["phase"], r["step"]) for r in validation_rows(out)] == [("base", 0), ("lora", 2)]
    resumed = fsdp_launch(tiny_flux_dev_path, out, root / "reward.py", 29579, *VALIDATE,
                          "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == list(range(1, STEPS + 1))
    assert max_abs_difference(out / LORA_WEIGHTS_NAME, root / "straight" / LORA_WEIGHTS_NAME) == 0
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(root / "straight")]
    # the series continued: its one base row kept, the rows those of the uninterrupted run
    assert validation_rows(out) == validation_rows(root / "straight")


@pytest.mark.slow
def test_nonfinite_steps_on_one_rank_are_skipped_by_all_and_stop_the_sharded_run(fsdp_run, tiny_flux_dev_path):
    root, _ = fsdp_run
    out = root / "nan"
    # Rank 1's reward is NaN from its 3rd call: steps 2 and 3 (2 micro-steps a step) are skipped on both ranks.
    result = fsdp_launch(tiny_flux_dev_path, out, root / "reward.py", 29581, "--checkpointing_steps", "1",
                         "--max_nonfinite_steps", "2", NAN_FROM="3")
    assert result.returncode != 0 and "exitcode  : 3" in result.stderr, result.stderr[-3000:]  # as torchrun reports
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors and all("2 steps in a row (steps 2-3) had a non-finite loss or gradient" in e for e in errors)
    assert [m["nonfinite_steps"] for m in metrics(out)] == [0, 1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert max_abs_difference(out / "checkpoint-1" / LORA_WEIGHTS_NAME, out / "checkpoint-2" / LORA_WEIGHTS_NAME) == 0
    assert not (out / LORA_WEIGHTS_NAME).exists()
