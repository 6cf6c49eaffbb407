"""Kohya export: diffusers loads the kohya file and gives the same images as the diffusers file."""

import pytest
import torch
from lora_fixtures import save_random_lora
from safetensors.torch import load_file

from utils.lora import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME, export_kohya
from utils.run import export as cli


def render(pipe):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                guidance_scale=3.0, output_type="pt").images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_file_loads_in_diffusers_and_gives_the_same_images(family, tiny_sd_path, tiny_sdxl_path, tmp_path):
    from utils.families import load_family

    path = tiny_sdxl_path if family == "sdxl" else tiny_sd_path
    lora = save_random_lora(path, tmp_path / "run", rank=4, alpha=8)  # alpha != rank: must be carried over
    written = export_kohya(lora)
    assert written == lora / KOHYA_WEIGHTS_NAME
    state = load_file(written)
    alphas = {k: v for k, v in state.items() if k.endswith(".alpha")}
    downs = [k for k in state if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in downs)
    assert len(alphas) == len(downs) and {float(v) for v in alphas.values()} == {8.0}

    pipe = load_family(str(path)).pipe
    base = render(pipe)
    pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHTS_NAME)
    diffusers_images = render(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(lora), weight_name=KOHYA_WEIGHTS_NAME)
    kohya_images = render(pipe)
    assert (diffusers_images - base).abs().max() > 0.05  # the LoRA matters
    torch.testing.assert_close(kohya_images, diffusers_images, rtol=0, atol=1e-5)


def test_command_converts_an_output_dir_and_reports_bad_input(tiny_sd_path, tmp_path, capsys):
    lora = save_random_lora(tiny_sd_path, tmp_path / "run")
    assert cli.main([str(lora)]) == 0
    assert (lora / KOHYA_WEIGHTS_NAME).is_file()
    assert str(lora / KOHYA_WEIGHTS_NAME) in capsys.readouterr().out
    assert cli.main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no pytorch_lora_weights.safetensors")
    not_lora = tmp_path / "not-lora"
    not_lora.mkdir()
    (not_lora / LORA_WEIGHTS_NAME).write_bytes(b"garbage")
    assert cli.main([str(not_lora)]) == 2
    assert not (not_lora / KOHYA_WEIGHTS_NAME).exists() and not list(not_lora.glob(".tmp-*"))
