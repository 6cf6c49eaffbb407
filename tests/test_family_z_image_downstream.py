"""Z-Image downstream of the rollout (`ZImagePipeline`, a tiny random one): the LoRA files (diffusers', ComfyUI's)
load into the pipeline, the model card names the license, AIG works on the transformer's list outputs, live
validation renders the rollout's images, the evaluator's defaults; and (slow) training under `accelerate launch`,
--compile, a 2-process gloo run and a resume."""

import json

import pytest
import torch
from diffusers import ZImagePipeline
from lora_fixtures import save_random_lora
from safetensors.torch import load_file
from test_family_z_image import (
    HEIGHT,
    PROMPTS,
    SEQ,
    WIDTH,
    add_random_lora,
    load,
    models_of,
    noise_for,
    parse,
)

from utils.families.z_image import ZImage
from utils.lora import COMFYUI_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from utils.rollout.loop import Models, RolloutConfig, draftplus_step, rollout

# ------------------------------------------------------------- LoRA files, the card, AIG


def render(pipe, guidance_scale=4.0):
    with torch.no_grad():
        return pipe("a red circle", height=HEIGHT, width=WIDTH, num_inference_steps=3, max_sequence_length=SEQ,
                    guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.fixture(scope="module")
def random_lora(tiny_z_image_path, tmp_path_factory):
    """A random LoRA on the tiny model's attention (rank 4, alpha 8) that changes its images."""
    return save_random_lora(tiny_z_image_path, tmp_path_factory.mktemp("z-lora"), rank=4, alpha=8, strength=4.0)


def comfyui_and_plain(out):
    """The ComfyUI file of a LoRA directory, and its diffusers file with the ComfyUI file's key prefix."""
    plain = load_file(out / LORA_WEIGHTS_NAME)
    assert all(k.startswith("transformer.") for k in plain)
    comfy = load_file(out / COMFYUI_WEIGHTS_NAME)
    assert all(k.startswith("diffusion_model.") for k in comfy)
    return {"diffusion_model." + k.removeprefix("transformer."): v for k, v in plain.items()}, comfy


def test_the_pipeline_loads_the_diffusers_and_the_comfyui_files_with_the_same_images(tiny_z_image_path, random_lora,
                                                                                      tmp_path):
    """The ComfyUI file: diffusers' module names under `diffusion_model.` (as other trainers' Z-Image LoRAs), the
    diffusers tensors unchanged, plus a `.alpha` for every module (the real alpha); ZImagePipeline's loader
    converts it with its alphas, so both files give the same images, not the base model's."""
    import shutil

    lora = tmp_path / "run"
    shutil.copytree(random_lora, lora)
    written = ZImage.export_ui_lora(lora / LORA_WEIGHTS_NAME)
    assert written == lora / COMFYUI_WEIGHTS_NAME
    plain, comfy = comfyui_and_plain(lora)
    modules = {k.removesuffix(".lora_A.weight") for k in plain if k.endswith(".lora_A.weight")}
    alphas = {k.removesuffix(".alpha"): v for k, v in comfy.items() if k.endswith(".alpha")}
    assert len(modules) == 16 and alphas.keys() == modules and all(float(v) == 8.0 for v in alphas.values())
    assert {k for k in comfy if not k.endswith(".alpha")} == plain.keys()
    assert all(torch.equal(comfy[k], v) for k, v in plain.items())

    pipe = ZImagePipeline.from_pretrained(tiny_z_image_path)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHTS_NAME)
    config = next(iter(pipe.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)
    with_lora = render(pipe)
    assert (with_lora - base).abs().max() > 1e-3
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(lora), weight_name=COMFYUI_WEIGHTS_NAME)
    torch.testing.assert_close(render(pipe), with_lora, rtol=0, atol=1e-5)


def test_the_card_names_the_apache_license_and_the_comfyui_file(tiny_z_image_path, tmp_path, monkeypatch):
    """Z-Image-Turbo's card is not on disk here: its license is named as Tongyi-MAI/Z-Image-Turbo declares it."""
    import huggingface_hub
    from huggingface_hub import ModelCard

    from utils.run.model_card import model_card_text

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args = parse(tiny_z_image_path, tmp_path, "--num_inference_steps", "9", "--guidance_scale", "0")
    args.pretrained_model_name_or_path = "Tongyi-MAI/Z-Image-Turbo"
    card = ModelCard(model_card_text(args, "ZImagePipeline", "me/z-lora", ui_lora=COMFYUI_WEIGHTS_NAME))
    assert card.data.base_model == "Tongyi-MAI/Z-Image-Turbo" and "z-image" in card.data.tags
    assert card.data.license == "apache-2.0"
    assert f"| `{COMFYUI_WEIGHTS_NAME}` | ComfyUI" in card.text
    assert "`ZImagePipeline.load_lora_weights` loads it too" in card.text
    assert 'ZImagePipeline.from_pretrained("Tongyi-MAI/Z-Image-Turbo", dtype=torch.bfloat16)' in card.text


def test_aig_base_and_lora_schedules_reproduce_the_pipeline_on_its_list_outputs(tiny_z_image_path, random_lora):
    """ZImagePipeline calls its transformer positionally with (1000 - t) / 1000 and gets a list of images back:
    AIG finds every step and mixes image by image."""
    from utils.evaluation.aig import annealed_guidance, schedule_weights

    pipe = ZImagePipeline.from_pretrained(tiny_z_image_path)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    pipe.load_lora_weights(str(random_lora))
    with_lora = render(pipe)
    assert (with_lora - base).abs().max() > 1e-3
    with annealed_guidance(pipe, "base") as aig:
        assert torch.equal(render(pipe), base)
    assert aig.weights_used == [(i, 3, 0.0) for i in range(3)]  # one call per step (CFG batched)
    with annealed_guidance(pipe, "lora"):
        assert torch.equal(render(pipe), with_lora)
    with annealed_guidance(pipe, "linear") as aig:
        middle = render(pipe)
    assert [w for _, _, w in aig.weights_used] == schedule_weights("linear", 3)
    gap = (with_lora - base).abs().mean()
    assert 0.01 * gap < (middle - base).abs().mean() < gap


def test_validation_renders_the_rollouts_images_from_the_rollouts_noise(tiny_z_image_path, tmp_path):
    """Live validation samples with ZImagePipeline from the noise the rollout draws for its seeds (with the negative
    prompt and the family's guidance options): with `--final_latent sample` the rollout's images are the same, for
    the LoRA and the base. (Unguided validation: the slow training run.)"""
    from types import SimpleNamespace

    from diffusers.utils.torch_utils import randn_tensor
    from test_validation import FakeAccelerator

    from rewards import build_reward
    from utils.lora import adapters_disabled
    from utils.run.validation import Validation

    family = load(tiny_z_image_path, cfg_normalization=1.0, cfg_truncation=0.2)
    add_random_lora(family)
    models = models_of(family)
    guidance, negative = 4.0, "a blue square"
    args = SimpleNamespace(validation_prompts=["a red circle"], num_validation_images=2, seed=3,
                           negative_prompt=negative, num_inference_steps=3, guidance_scale=guidance, eta=0.0,
                           height=HEIGHT, width=WIDTH, output_dir=str(tmp_path / "run"), validation_diversity=None)
    validation = Validation(args, FakeAccelerator(), models, build_reward("redness"))
    base, lora = validation.render_base(), validation(1)
    assert (lora.images - base.images).abs().max() > 1e-3  # the LoRA matters
    noise = randn_tensor(family.latent_shape(2, HEIGHT, WIDTH),
                         generator=[torch.Generator().manual_seed(3 + k) for k in range(2)])
    config = RolloutConfig(num_inference_steps=3, guidance_scale=guidance, final_latent="sample")
    cond = family.encode_prompts(["a red circle"] * 2, negative, config.guided)
    with torch.no_grad():
        lora_rollout = rollout(models, cond, noise, config, with_reference=False).images
        with adapters_disabled(family.denoiser):
            base_rollout = rollout(models, cond, noise, config, with_reference=False).images
    torch.testing.assert_close(lora.images, lora_rollout, rtol=0, atol=1e-6)
    torch.testing.assert_close(base.images, base_rollout, rtol=0, atol=1e-6)


def test_the_evaluators_sampler_defaults_are_the_pipelines(tiny_z_image_path):
    from utils.evaluation.evaluate import family_of_model, with_family_defaults

    model = str(tiny_z_image_path)
    assert with_family_defaults(family_of_model(model), model, {"scheduler": None}) == {
        "scheduler": "model", "num_inference_steps": 50, "guidance_scale": 5.0,
        "family_options": {"max_sequence_length": 512, "cfg_normalization": 0.0, "cfg_truncation": 1.0}}


# ------------------------------------------------------------- training, end to end


@pytest.mark.slow
def test_z_image_trains_under_accelerate_launch_and_its_lora_loads_into_the_pipeline(tiny_z_image_path, tmp_path):
    """Turbo-style (no guidance) with live validation: rewards and penalty logged, the LoRA, the ComfyUI file with
    an alpha for every module, the card; the LoRA loads into ZImagePipeline at its alpha and changes the images;
    the evaluator scores it."""
    from test_flow_train import accelerate_launch, base_args, metrics

    out = tmp_path / "z"
    result = accelerate_launch(*base_args(tiny_z_image_path, out, "--max_train_steps", "2", "--checkpointing_steps",
                                          "2", "--guidance_scale", "0", "--max_sequence_length", str(SEQ),
                                          "--validation_prompts", "a red circle", "--num_validation_images", "1",
                                          "--validation_steps", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert all(isinstance(m["reward"], float) for m in metrics(out)) and metrics(out)[1]["kl_penalty"] > 0
    plain, comfy = comfyui_and_plain(out)
    modules = {k.removesuffix(".lora_A.weight") for k in plain if k.endswith(".lora_A.weight")}
    assert len(modules) == 28 and {k.removesuffix(".alpha") for k in comfy if k.endswith(".alpha")} == modules
    assert all(float(comfy[f"{m}.alpha"]) == 8.0 for m in modules)
    card = (out / "README.md").read_text()
    assert "ZImagePipeline" in card and f"| `{COMFYUI_WEIGHTS_NAME}` | ComfyUI" in card

    pipe = ZImagePipeline.from_pretrained(tiny_z_image_path)
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe, guidance_scale=0.0)
    pipe.load_lora_weights(str(out))
    config = next(iter(pipe.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)
    assert (render(pipe, guidance_scale=0.0) - before).abs().max() > 1e-4

    from utils.evaluation import evaluate as ev

    result = ev.evaluate(str(tiny_z_image_path), list(PROMPTS), reward="redness", loras=[out], lora_scales=[0],
                         diversity_metric="pixel_l2", device="cpu", num_inference_steps=3, guidance_scale=0.0,
                         height=HEIGHT, width=WIDTH, seeds_per_prompt=2)
    (base,) = (r for r in result.rows if r["model"] == "base")
    (lora, scale_0) = sorted((r for r in result.rows if r["model"] != "base"), key=lambda r: r["lora_scale"] == 0)
    assert scale_0["lora_scale"] == 0 and scale_0["reward_mean"] == pytest.approx(base["reward_mean"], abs=1e-6)
    assert lora["reward_mean"] != pytest.approx(base["reward_mean"], abs=1e-6)
    assert json.loads((out / "validation_reward.json").read_text())["step"] == 2


@pytest.mark.slow
def test_compile_gives_the_eager_rollout_with_two_graphs_and_none_after_warm_up(tiny_z_image_path):
    """--compile on Z-Image (`aot_eager`, as tests/test_compile.py): the transformer's no-grad calls through
    torch.compile (fullgraph: its RoPE table is filled before the first call), the eager rewards, penalty and LoRA
    gradients; one graph per adapter state, none for a later sample of other T and K."""
    import torch._dynamo

    from rewards import build_reward
    from utils.rollout.compile import compile_no_grad_denoiser, compiled_graph_count, no_new_graphs

    family = load(tiny_z_image_path)
    params = add_random_lora(family)
    eager = models_of(family)
    no_grad_denoiser = compile_no_grad_denoiser(family.denoiser, family.vae, backend="aot_eager")
    compiled = Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                      scheduler=eager.scheduler, no_grad_denoiser=no_grad_denoiser)
    noise = noise_for(family)

    def step(models, config):
        loss, rewards, penalty = draftplus_step(models, build_reward("redness"), ["a red circle", "a dog"], noise,
                                                config, kl_coeff=1.0)
        return rewards, penalty, torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    config = RolloutConfig(num_inference_steps=3, guidance_scale=4.0)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            before = compiled_graph_count()
            r_c, p_c, g_c = step(compiled, config)
            assert compiled_graph_count() - before == 2  # one per adapter state
            r_e, p_e, g_e = step(eager, config)
            torch.testing.assert_close(r_c, r_e, rtol=0, atol=1e-5)
            torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=0)
            assert p_e > 0 and ((g_c - g_e).norm() / g_e.norm()).item() < 1e-4
            with no_new_graphs("Z-Image training samples after warm-up"):
                step(compiled, RolloutConfig(num_inference_steps=4, guidance_scale=4.0, truncation_steps=2))
    finally:
        no_grad_denoiser.close()


@pytest.mark.slow
def test_two_process_gloo_run_with_compile_resumes_and_trains_z_image(tiny_z_image_path, tmp_path):
    """Real DDP over gloo with the transformer's list inputs and --compile: both ranks end with the same LoRA; a
    one-process run resumed from its checkpoint-1 ends where the straight run does."""
    import os
    import shutil
    import subprocess
    import sys

    from test_flow_train import ROOT, SCRIPT, accelerate_launch, base_args, metrics

    extra = ("--max_sequence_length", str(SEQ), "--guidance_scale", "4", "--negative_prompt", "a blue square",
             "--cfg_truncation", "0.9")
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "DRAFTPLUS_COMPILE_BACKEND": "aot_eager"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29547", SCRIPT, *base_args(tiny_z_image_path, out, "--max_train_steps", "2",
                                                         "--checkpointing_steps", "2", "--compile", *extra)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Num processes: 2" in result.stderr and [m["step"] for m in metrics(out)] == [1, 2]
    digests = {line.split("LoRA weights digest ")[1].split()[0] for line in result.stderr.splitlines()
               if "LoRA weights digest" in line}
    assert len(digests) == 1

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert accelerate_launch(*base_args(tiny_z_image_path, straight, "--max_train_steps", "2", "--checkpointing_steps",
                                        "1", *extra)).returncode == 0
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    (resumed / "metrics.jsonl").write_text((straight / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    second = accelerate_launch(*base_args(tiny_z_image_path, resumed, "--max_train_steps", "2",
                                          "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest", *extra))
    assert second.returncode == 0, second.stderr[-3000:]
    assert metrics(resumed)[1]["reward"] == pytest.approx(metrics(straight)[1]["reward"], rel=1e-5)
    assert metrics(resumed)[1]["kl_penalty"] == pytest.approx(metrics(straight)[1]["kl_penalty"], rel=1e-4)
