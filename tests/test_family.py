"""The model-family layer: detection from model_index.json, SDXL conditioning, VAE precision, LoRA format."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from lora_fixtures import randomise_lora_B

from utils.families import (
    StableDiffusion,
    StableDiffusionXL,
    UnsupportedModelError,
    family_of,
    load_family,
    read_model_index,
)
from utils.lora import add_lora, save_lora
from utils.rollout.loop import Models, RolloutConfig, decode, draftplus_step, rollout

PROMPTS = ["a red circle", "a cat"]


def test_family_is_read_from_model_index(tiny_sd_path, tiny_sdxl_path, tmp_path):
    assert family_of(str(tiny_sd_path)) is StableDiffusion
    assert family_of(str(tiny_sdxl_path)) is StableDiffusionXL
    assert family_of("toy") is StableDiffusion
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(UnsupportedModelError, match="KandinskyV22Pipeline pipelines are not supported"):
        family_of(str(tmp_path))
    assert StableDiffusionXL.pipeline_class() is StableDiffusionXLPipeline
    assert StableDiffusion.pipeline_class() is StableDiffusionPipeline


def test_the_toys_family_is_read_without_building_it(monkeypatch, tmp_path):
    """The toy's model_index.json is committed: checking `--pretrained_model_name_or_path toy` builds nothing,
    even with an empty cache and a committed toy that would need a rebuild to load."""
    import train_draftplus
    import utils.toys.toy

    def no_build(*args, **kwargs):
        raise AssertionError("the argument checks built the toy")

    monkeypatch.setattr(utils.toys.toy, "build_toy_pipeline", no_build)
    monkeypatch.setenv("DRAFTPLUS_CACHE", str(tmp_path / "empty-cache"))
    committed = json.loads((utils.toys.toy.ASSETS_DIR / "model_index.json").read_text())
    assert read_model_index("toy") == committed and read_model_index("toy", local_only=True) == committed
    assert family_of("toy") is StableDiffusion
    args = train_draftplus.parse_args(["--pretrained_model_name_or_path", "toy", "--reward", "redness", "--prompts",
                                       "animals", "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    assert args.pretrained_model_name_or_path == "toy"
    assert not (tmp_path / "empty-cache").exists()


def test_the_flow_toys_arguments_are_checked_from_its_committed_files_offline(monkeypatch, tmp_path):
    """`--pretrained_model_name_or_path toy-flow` is a local model: its transformer config (which the SD3 family's
    rollout defaults and LoRA presets read) comes from assets/toy-flow, not from a hub repository named toy-flow."""
    import train_draftplus
    import utils.toys.toy
    from utils.families import StableDiffusion3, read_denoiser_config

    monkeypatch.setattr(utils.toys.toy, "build_toy_pipeline", lambda *a, **k: pytest.fail("the argument checks built it"))
    flow = utils.toys.toy.TOYS["toy-flow"].assets_dir
    assert read_denoiser_config("toy-flow") == json.loads((flow / "transformer" / "config.json").read_text())
    assert family_of("toy-flow") is StableDiffusion3
    args = train_draftplus.parse_args(["--pretrained_model_name_or_path", "toy-flow", "--reward", "redness",
                                       "--prompts", "animals", "--output_dir", str(tmp_path / "out"),
                                       "--report_to", "none"])
    assert args.pretrained_model_name_or_path == "toy-flow"


def test_a_hub_models_index_and_denoiser_config_come_from_the_hub_cache(tmp_path, monkeypatch):
    """With `local_only` (the argument checks), both files of a hub id are read from the hub cache, never
    downloaded; a model the cache lacks gives None."""
    import huggingface_hub

    from utils.families import read_denoiser_config

    repo = tmp_path / "models--someone--sd"
    (repo / "snapshots" / "0123abcd" / "unet").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (repo / "snapshots" / "0123abcd" / "model_index.json").write_text(json.dumps(index))
    (repo / "snapshots" / "0123abcd" / "unet" / "config.json").write_text(json.dumps({"sample_size": 8}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert read_model_index("someone/sd", local_only=True) == index
    assert read_denoiser_config("someone/sd", local_only=True) == {"sample_size": 8}
    assert read_model_index("someone/other", local_only=True) is None
    assert read_denoiser_config("someone/other", local_only=True) is None


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path):
    return load_family(str(tiny_sdxl_path))


def test_sdxl_conditioning_is_the_pipelines(sdxl):
    """Both encoders' penultimate states, the pooled embedding, zeros for an empty negative prompt
    (force_zeros_for_empty_prompt), and (original, crop, target) time ids from the image size."""
    cond = sdxl.encode_prompts(PROMPTS, "", guided=True, height=32, width=48)
    assert cond.encoder_hidden_states.shape == (4, 77, 64)
    assert torch.equal(cond.encoder_hidden_states[:2], torch.zeros_like(cond.encoder_hidden_states[:2]))
    assert torch.equal(cond.added_cond_kwargs["text_embeds"][:2], torch.zeros(2, 32))
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]] * 4
    embeds, negative, pooled, negative_pooled = sdxl.pipe.encode_prompt(PROMPTS, negative_prompt=None)
    torch.testing.assert_close(cond.encoder_hidden_states[2:], embeds)
    torch.testing.assert_close(cond.added_cond_kwargs["text_embeds"][2:], pooled)

    with_negative = sdxl.encode_prompts(PROMPTS, "blurry", guided=True, height=32, width=32)
    assert with_negative.encoder_hidden_states[:2].abs().sum() > 0
    unguided = sdxl.encode_prompts(PROMPTS, "", guided=False, height=32, width=32)
    assert unguided.encoder_hidden_states.shape[0] == 2 and unguided.added_cond_kwargs["time_ids"].shape == (2, 6)


@pytest.mark.parametrize("negative_prompt", ["", "a blue square"])
def test_sdxl_rollout_with_final_sample_equals_the_sdxl_pipeline(sdxl, negative_prompt):
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    config = RolloutConfig(num_inference_steps=4, guidance_scale=5.0, final_latent="sample")
    cond = sdxl.encode_prompts(PROMPTS, negative_prompt, True, height=32, width=32)
    scheduler = sdxl.pipe.scheduler.__class__.from_config(sdxl.pipe.scheduler.config)
    models = Models(family=sdxl, denoiser=sdxl.denoiser, raw_denoiser=sdxl.denoiser, vae=sdxl.vae, scheduler=scheduler)
    with torch.no_grad():
        ours = rollout(models, cond, z, config, with_reference=False).images
        theirs = sdxl.pipe(PROMPTS, negative_prompt=[negative_prompt] * 2 if negative_prompt else None,
                           latents=z.clone(), num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                           output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_sdxl_draftplus_step_trains_the_lora_against_the_adapters_off_reference(tiny_sdxl_path):
    family = load_family(str(tiny_sdxl_path))
    for module in (family.vae, family.denoiser, *family.text_encoders):
        module.requires_grad_(False)
    params = add_lora(family.denoiser, rank=4, target_modules=family.target_modules(["attention+ff"]))
    randomise_lora_B(family.denoiser)
    scheduler = family.pipe.scheduler.__class__.from_config(family.pipe.scheduler.config)
    models = Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae, scheduler=scheduler)
    z = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    for config in (RolloutConfig(num_inference_steps=3, guidance_scale=5.0),
                   RolloutConfig(num_inference_steps=3, guidance_scale=5.0, truncation_steps=2),
                   RolloutConfig(num_inference_steps=3, guidance_scale=5.0, lv_samples=2)):
        loss, rewards, penalty = draftplus_step(models, lambda x, p: x[:, 0].mean((1, 2)), PROMPTS, z, config, 1.0,
                                                generator=torch.Generator().manual_seed(0))
        grads = torch.autograd.grad(loss, params)
        assert penalty.item() > 0 and rewards.shape == (2 * max(1, config.lv_samples),)
        assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert any("ff.net.2" in n for n, _ in family.denoiser.named_parameters() if "lora" in n)


def test_sdxl_lora_saves_in_diffusers_format_and_loads_into_the_sdxl_pipeline(tiny_sdxl_path, tmp_path):
    family = load_family(str(tiny_sdxl_path))
    add_lora(family.denoiser, rank=4, lora_alpha=2)
    randomise_lora_B(family.denoiser, std=0.3, seed=None)
    save_lora(family.denoiser, tmp_path, family)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, output_type="pt")
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path)
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    config = next(iter(pipe.unet.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 2)
    assert (after - before).abs().max() > 1e-3


def test_a_lora_trained_with_dropout_renders_without_it_in_diffusers(tiny_sd_path, tmp_path):
    """Dropout is a training device: the saved LoRA must not bring it into `pipe.load_lora_weights` renders
    (PEFT builds the loaded adapter's dropout in training mode, and the pipeline never switches it off)."""
    family = load_family(str(tiny_sd_path))
    add_lora(family.denoiser.eval(), rank=4, lora_dropout=0.5)
    randomise_lora_B(family.denoiser, std=0.3, seed=None)
    save_lora(family.denoiser, tmp_path, family)
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, output_type="pt")
    with torch.no_grad():
        trained = family.pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path)
    first, second = (pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images for _ in range(2))
    assert torch.equal(first, second)
    torch.testing.assert_close(first, trained, atol=1e-5, rtol=1e-5)  # the LoRA the trainer validated
    assert next(iter(pipe.unet.peft_config.values())).lora_dropout == 0.0


def test_vae_precision_follows_the_sdxl_pipeline(sdxl, tiny_sd_path):
    """SDXL's own VAE stays fp32 under fp16 (force_upcast), a fixed VAE or bf16 does not; SD is never upcast."""
    assert sdxl.vae_dtype(torch.float16) == torch.float32
    assert sdxl.vae_dtype(torch.bfloat16) == torch.bfloat16
    sdxl.vae.register_to_config(force_upcast=False)
    try:
        assert sdxl.vae_dtype(torch.float16) == torch.float16
    finally:
        sdxl.vae.register_to_config(force_upcast=True)
    assert load_family(str(tiny_sd_path)).vae_dtype(torch.float16) == torch.float16


def test_an_upcast_vae_decodes_outside_autocast(sdxl):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = decode(sdxl.vae, z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = decode(sdxl.vae, z)
    assert torch.equal(plain, under_autocast)


def test_replacement_vae_is_loaded(tiny_sdxl_path, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl_path, subfolder="vae")
    vae.register_to_config(force_upcast=False)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)
    vae.save_pretrained(tmp_path / "vae-fix")
    family = load_family(str(tiny_sdxl_path), vae_name_or_path=str(tmp_path / "vae-fix"))
    assert family.vae.config.force_upcast is False and family.vae_dtype(torch.float16) == torch.float16
    torch.testing.assert_close(family.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias)


def test_lora_target_presets():
    for family in (StableDiffusion, StableDiffusionXL):
        assert family.target_modules(["attention"]) == ["to_k", "to_q", "to_v", "to_out.0"]
        assert family.target_modules(["attention+ff"]) == ["to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj",
                                                           "ff.net.2"]
        assert family.target_modules(["to_q", "proj_in", "to_q"]) == ["to_q", "proj_in"]
