"""The ComfyUI file of the flow-matching families (SD3/SD3.5, FLUX.1): diffusers' transformer keys plus one alpha
tensor per module, written by default next to the diffusers file (and by `python -m utils.run.export` later).

ComfyUI reads no safetensors metadata: without the alpha tensors its FLUX and SD3 loaders take alpha = rank
(measured with ComfyUI's own loader on files of the real FLUX.1-dev and SD3.5-Medium module names; ComfyUI is
not part of this repository, so these tests hold the file to what was measured: every module, its real alpha,
the diffusers tensors unchanged)."""

import json

import pytest
import torch
from lora_fixtures import save_random_lora
from safetensors.torch import load_file

from utils.families import family_of
from utils.lora import COMFYUI_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from utils.run import export as cli

SEQ = 16


@pytest.mark.parametrize("fixture", ["tiny_flux_dev_path", "tiny_sd3_path"])
def test_the_comfyui_file_is_the_diffusers_file_plus_the_real_alpha_of_every_module(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    family = family_of(str(path))
    # the family's fullest preset: both streams' attention (the text stream's add_*_proj, to_add_out) and MLPs
    config = json.loads((path / "transformer" / "config.json").read_text())
    targets = family.target_modules(["attention+ff"], config)
    lora = save_random_lora(path, tmp_path / "run", rank=4, alpha=8, targets=targets)  # alpha != rank: carried over
    written = family.export_ui_lora(lora / LORA_WEIGHTS_NAME)  # what the trainer calls at the end of a run
    assert written == lora / COMFYUI_WEIGHTS_NAME == lora / family.ui_lora_name

    plain, comfy = load_file(lora / LORA_WEIGHTS_NAME), load_file(written)
    modules = {k.removesuffix(".lora_A.weight") for k in plain if k.endswith(".lora_A.weight")}
    alphas = {k.removesuffix(".alpha"): v for k, v in comfy.items() if k.endswith(".alpha")}
    assert alphas.keys() == modules
    assert {m.rsplit(".", 1)[-1] for m in modules} >= {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert all(v.dtype == torch.float32 and v.ndim == 0 and float(v) == 8.0 for v in alphas.values())
    assert {k for k in comfy if not k.endswith(".alpha")} == plain.keys()
    assert all(torch.equal(comfy[k], v) for k, v in plain.items())
    assert all(k.startswith("transformer.") for k in comfy)


def render(pipe):
    with torch.no_grad():
        return pipe("a red circle", height=48, width=32, num_inference_steps=3, max_sequence_length=SEQ,
                    guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_flux_pipeline_loads_the_comfyui_file_with_the_images_of_the_diffusers_file(tiny_flux_dev_path, tmp_path):
    """FluxPipeline.load_lora_weights reads the alpha tensors as network alphas: the same LoRA, at alpha/rank."""
    from diffusers import FluxPipeline

    lora = save_random_lora(tiny_flux_dev_path, tmp_path / "run", rank=4, alpha=8, strength=2.0)
    family_of(str(tiny_flux_dev_path)).export_ui_lora(lora / LORA_WEIGHTS_NAME)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dev_path)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHTS_NAME)
    plain = render(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(lora), weight_name=COMFYUI_WEIGHTS_NAME)
    comfy = render(pipe)
    assert (plain - base).abs().max() > 0.01  # the LoRA matters
    torch.testing.assert_close(comfy, plain, rtol=0, atol=1e-6)


def test_sd3_pipeline_refuses_the_comfyui_file_and_loads_the_diffusers_file(tiny_sd3_path, tmp_path):
    """What the README and the model card tell SD3 users: in diffusers, load pytorch_lora_weights.safetensors."""
    from diffusers import StableDiffusion3Pipeline

    lora = save_random_lora(tiny_sd3_path, tmp_path / "run", rank=4, alpha=8)
    family_of(str(tiny_sd3_path)).export_ui_lora(lora / LORA_WEIGHTS_NAME)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        pipe.load_lora_weights(str(lora), weight_name=COMFYUI_WEIGHTS_NAME)
    pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHTS_NAME)
    config = next(iter(pipe.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)


def test_the_export_command_writes_each_familys_file(tiny_flux_dev_path, tiny_sd_path, tmp_path, capsys):
    flux, sd = (save_random_lora(path, tmp_path / name) for path, name in ((tiny_flux_dev_path, "flux"),
                                                                           (tiny_sd_path, "sd")))
    # A transformer LoRA's keys fit several families whose ComfyUI files differ: without a run record, the model
    # decides; a UNet LoRA's keys leave no doubt.
    assert cli.main([str(flux)]) == 2 and "give the model it was trained on (--model)" in capsys.readouterr().err
    assert not (flux / COMFYUI_WEIGHTS_NAME).exists()
    assert cli.main([str(flux), "--model", str(tiny_flux_dev_path)]) == 0
    assert cli.main([str(sd / LORA_WEIGHTS_NAME)]) == 0
    assert capsys.readouterr().out.split() == [str(flux / COMFYUI_WEIGHTS_NAME), str(sd / KOHYA_WEIGHTS_NAME)]
    assert not (flux / KOHYA_WEIGHTS_NAME).exists() and not (sd / COMFYUI_WEIGHTS_NAME).exists()
    assert load_file(flux / COMFYUI_WEIGHTS_NAME).keys() > load_file(flux / LORA_WEIGHTS_NAME).keys()
