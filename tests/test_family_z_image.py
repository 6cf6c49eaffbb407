"""Z-Image / Z-Image-Turbo (`ZImagePipeline`, a tiny random one): the rollout is the pipeline's `__call__` (its
list inputs, its (1000 - t) / 1000 timestep and negated output, its guidance with normalisation and truncation),
a hand-written DRaFT+ step gives the same LoRA gradient, DRaFT-K and DRaFT-LV run, the options a Z-Image run
takes and refuses, the presets. Downstream (LoRA files, card, AIG, validation, training): its _downstream file."""

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
from lora_fixtures import randomise_lora_B

from utils.families import family_of, load_family
from utils.families.z_image import ZImage
from utils.lora import add_lora
from utils.rollout.loop import Models, RolloutConfig, draftplus_step, rollout

PROMPTS = ("a red circle", "a blue square")  # a tuple: ZImagePipeline rewrites a prompt list it is given in place
SEQ = 32  # --max_sequence_length: the chat-templated prompts fit
HEIGHT, WIDTH = 48, 32  # non-square: 24x16 latents (the tiny VAE has factor 2), 12x8 patches


def load(path, **options):
    family = load_family(str(path), max_sequence_length=SEQ, **options)
    for module in (family.vae, family.denoiser, *family.text_encoders):
        module.requires_grad_(False)  # frozen, as the trainer has them
    return family


def models_of(family):
    scheduler = type(family.pipe.scheduler).from_config(family.pipe.scheduler.config)  # the rollout's own
    return Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                  scheduler=scheduler)


def noise_for(family, height=HEIGHT, width=WIDTH, batch=2, seed=0):
    return torch.randn(batch, family.latent_channels, height // 2, width // 2,
                       generator=torch.Generator().manual_seed(seed))


def mean_red(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


def add_random_lora(family, seed=1):
    params = add_lora(family.denoiser, rank=4, lora_alpha=8,
                      target_modules=family.target_modules(["attention+ff"], family.denoiser.config))
    randomise_lora_B(family.denoiser, seed=seed)
    return params


def pipeline_images(family, noise, guidance, negative="", steps=4, **kwargs):
    height, width = (2 * s for s in noise.shape[-2:])
    with torch.no_grad():
        return family.pipe(list(PROMPTS), negative_prompt=[negative] * len(PROMPTS) if negative else None,
                           latents=noise.clone(), height=height, width=width, num_inference_steps=steps,
                           guidance_scale=guidance, output_type="pt", **family.pipeline_kwargs(), **kwargs).images


def rollout_images(family, noise, guidance, negative="", steps=4, final_latent="sample"):
    config = RolloutConfig(num_inference_steps=steps, guidance_scale=guidance, final_latent=final_latent)
    with torch.no_grad():
        return rollout(models_of(family), family.encode_prompts(PROMPTS, negative, config.guided), noise, config,
                       with_reference=False).images


# name -> (family options, guidance_scale, negative prompt, height, width)
CASES = {
    "turbo-unguided": ({}, 0.0, "", HEIGHT, WIDTH),
    "turbo-unguided-square": ({}, 0.0, "", 32, 32),
    "cfg-negative": ({}, 4.0, "a green triangle", HEIGHT, WIDTH),
    "cfg-normalised-truncated-square": ({"cfg_normalization": 1.0, "cfg_truncation": 0.2}, 4.0, "", 32, 32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rollout_images_equal_the_pipelines(case, tiny_z_image_path):
    """Same noise, sigmas and transformer calls: ZImagePipeline's images, bit for bit (`--final_latent sample`)."""
    options, guidance, negative, height, width = CASES[case]
    family = load(tiny_z_image_path, **options)
    noise = noise_for(family, height, width)
    images = rollout_images(family, noise, guidance, negative)
    assert images.shape == (2, 3, height, width)
    torch.testing.assert_close(images, pipeline_images(family, noise, guidance, negative), rtol=0, atol=0)


def test_normalisation_and_truncation_change_the_guided_prediction_where_the_pipeline_applies_them(tiny_z_image_path):
    """cfg_truncation 0.2 switches guidance off at the steps past it ((1000 - t) / 1000 > 0.2: the last ones);
    cfg_normalization caps the guided prediction's norm at the positive's: the images differ from plain CFG."""
    family = load(tiny_z_image_path, cfg_normalization=1.0, cfg_truncation=0.2)
    scheduler = copy.deepcopy(family.pipe.scheduler)
    family.set_timesteps(scheduler, 4, (16, 16))
    scales = [family.guidance_at(t, 4.0, guided=True) for t in scheduler.timesteps]
    assert scales[0] == 4.0 and scales[-1] == 0.0  # guided early, truncated late
    assert [s > 0 for s in scales] == [(1000 - float(t)) / 1000 <= 0.2 for t in scheduler.timesteps]
    noise = noise_for(family, 32, 32)
    plain = load(tiny_z_image_path)
    assert (rollout_images(family, noise, 4.0) - rollout_images(plain, noise, 4.0)).abs().max() > 1e-4
    assert family.guidance_at(scheduler.timesteps[0], 4.0, guided=False) == 0.0


def test_bf16_rollout_latents_equal_the_pipelines(tiny_z_image_path):
    """In bf16 the pipeline keeps its latents in fp32 and casts them to the transformer's dtype per call."""
    family = load_family(str(tiny_z_image_path), dtype=torch.bfloat16, max_sequence_length=SEQ)
    noise = noise_for(family)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=4.0)
    with torch.no_grad():
        out = rollout(models_of(family), family.encode_prompts(PROMPTS, "", config.guided), noise, config,
                      with_reference=False)
        expected = family.pipe(list(PROMPTS), latents=noise.clone(), height=HEIGHT, width=WIDTH, num_inference_steps=3,
                               guidance_scale=4.0, max_sequence_length=SEQ, output_type="latent").images
    assert out.latents.dtype == torch.float32 and torch.equal(out.latents, expected)


def test_sigmas_are_the_pipelines_static_shift_and_mu_under_dynamic_shifting(tiny_z_image_path):
    """Turbo's scheduler: sigmas linspace(1, 1/T, T) under the static shift 3; a dynamic-shift config: mu from the
    2x2-patch count, as ZImagePipeline computes it. Both end at 0."""
    family = load(tiny_z_image_path)
    static = copy.deepcopy(family.pipe.scheduler)
    family.set_timesteps(static, 4, (24, 16))
    s = torch.linspace(1.0, 1 / 4, 4).double()
    torch.testing.assert_close(static.sigmas[:-1].double(), 3 * s / (1 + 2 * s), rtol=1e-6, atol=0)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    family.set_timesteps(dynamic, 4, (24, 16))
    m = (1.15 - 0.5) / (4096 - 256)
    mu = torch.tensor(12 * 8 * m + 0.5 - m * 256).double()
    torch.testing.assert_close(dynamic.sigmas[:-1].double(), mu.exp() / (mu.exp() + (1 / s - 1)), rtol=1e-6, atol=0)
    assert static.sigmas[-1] == dynamic.sigmas[-1] == 0


# ------------------------------------------------------------- a hand-written DRaFT+ step (no family code)


def hand_z_image_step(pipe, noise, steps, guidance, kl_coeff):
    """Z-Image DRaFT+ by hand: the chat-templated Qwen3 embeddings, the static shift, list inputs at (1000 - t) /
    1000, CFG as pos + s (pos - neg) on the negated outputs, no-grad Euler prefix, graded last step (adapters on
    and off), x0 decoded."""
    tr, vae = pipe.transformer, pipe.vae
    embeds, negative = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=True, max_sequence_length=SEQ)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
    b = len(noise)

    def v_at(x, t):
        out = tr(list(torch.cat([x, x]).unsqueeze(2).unbind(0)), ((1000 - t) / 1000).expand(2 * b),
                 embeds + negative, return_dict=False)[0]
        pos, neg = torch.stack(out[:b]).squeeze(2), torch.stack(out[b:]).squeeze(2)
        return -(pos + guidance * (pos - neg))

    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            x = scheduler.step(v_at(x, t), t, x).prev_sample
    t, sigma = scheduler.timesteps[-1], scheduler.sigmas[-2]
    v = v_at(x, t)
    with torch.no_grad():
        tr.disable_adapters()
        v_ref = v_at(x, t)
        tr.enable_adapters()
    penalty = (v - v_ref).mul(1 - sigma).pow(2).mean()  # (1 - sigma)^2 times the velocity MSE
    images = vae.decode((x - sigma * v) / vae.config.scaling_factor + vae.config.shift_factor).sample
    return -mean_red((images / 2 + 0.5).clamp(0, 1), PROMPTS).mean() + kl_coeff * penalty


def test_lora_gradient_equals_a_hand_written_draftplus_step(tiny_z_image_path):
    family = load(tiny_z_image_path)
    params = add_random_lora(family)
    noise = noise_for(family)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=4.0)
    loss, _, penalty = draftplus_step(models_of(family), mean_red, list(PROMPTS), noise, config, kl_coeff=0.5)
    assert penalty > 0  # the LoRA moved the prediction
    grads = torch.autograd.grad(loss, params)
    hand_loss = hand_z_image_step(family.pipe, noise, 3, 4.0, 0.5)
    torch.testing.assert_close(loss, hand_loss, rtol=1e-5, atol=1e-6)
    assert sum(int(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)
    for g, h in zip(grads, torch.autograd.grad(hand_loss, params), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)


def test_k2_and_draft_lv_give_gradients_and_shapes(tiny_z_image_path):
    """DRaFT-K (K = 2, unguided as Turbo) and DRaFT-LV (2 re-noised copies, guided: the prompts' and the negative
    prompts' embeddings repeated image by image)."""
    family = load(tiny_z_image_path)
    params = add_random_lora(family)
    noise = noise_for(family)
    for config, images, graded in ((RolloutConfig(num_inference_steps=3, guidance_scale=0.0, truncation_steps=2), 2, 2),
                                   (RolloutConfig(num_inference_steps=2, guidance_scale=4.0, lv_samples=2), 4, 1)):
        cond = family.encode_prompts(PROMPTS, "", config.guided)
        out = rollout(models_of(family), cond, noise, config, generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (images, 3, HEIGHT, WIDTH) and len(out.eps) == len(out.eps_ref) == graded
        grads = torch.autograd.grad(out.images[:, 0].mean(), params, allow_unused=True)
        assert all(g is not None for g in grads) and sum(int(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)
    repeated = family.encode_prompts(PROMPTS, "", True).repeat_interleave(3)
    assert len(repeated.cond) == len(repeated.uncond) == 6 and repeated.cond[2] is repeated.cond[0]
    assert repeated.cond[3] is not repeated.cond[0] and repeated.uncond[5] is repeated.uncond[3]


# ------------------------------------------------------------- options, defaults, presets


def parse(tiny_z_image_path, tmp_path, *extra):
    import train_draftplus

    return train_draftplus.parse_args(["--pretrained_model_name_or_path", str(tiny_z_image_path), "--reward",
                                       "redness", "--resolution", "32", "--output_dir", str(tmp_path / "out"),
                                       "--report_to", "none", *extra])


def test_a_z_image_run_fills_in_the_pipelines_defaults(tiny_z_image_path, tmp_path):
    args = parse(tiny_z_image_path, tmp_path)
    expected = {"scheduler": "model", "num_inference_steps": 50, "guidance_scale": 5.0, "max_sequence_length": 512,
                "cfg_normalization": 0.0, "cfg_truncation": 1.0}
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.checked.family_options == {"max_sequence_length": 512, "cfg_normalization": 0.0, "cfg_truncation": 1.0}
    turbo = parse(tiny_z_image_path, tmp_path, "--num_inference_steps", "9", "--guidance_scale", "0")
    assert (turbo.num_inference_steps, turbo.guidance_scale) == (9, 0.0)


@pytest.mark.parametrize("extra, message", [
    (["--guidance_scale", "0.5"], "--guidance_scale for ZImagePipeline models is 0 (no guidance, as Z-Image-Turbo) "
                                  "or > 1, got 0.5"),
    (["--cfg_truncation", "1.5"], "--cfg_truncation must be in [0, 1]"),
    (["--cfg_normalization", "-1"], "--cfg_normalization must be >= 0"),
    (["--true_cfg_scale", "2"], "--true_cfg_scale is for FluxPipeline and QwenImagePipeline models; ZImagePipeline models do not take it"),
    (["--resolution", "40"], "--resolution must be a multiple of 16 for ZImagePipeline models"),
    (["--quantize_base", "nf4"], "--quantize_base nf4 (bitsandbytes 4-bit) needs a CUDA GPU"),
])
def test_options_a_z_image_run_cannot_honour_are_one_line_before_any_model_loads(extra, message, tiny_z_image_path,
                                                                                 tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(tiny_z_image_path, tmp_path, *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_other_families_refuse_the_z_image_options(tiny_flux_dev_path, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(tiny_flux_dev_path, tmp_path, "--cfg_truncation", "0.5")
    assert "--cfg_truncation is for ZImagePipeline models; FluxPipeline models do not take it" in capsys.readouterr().err


def test_presets_are_diffusers_z_image_scripts_and_match_every_block(tiny_z_image_path):
    family = family_of(str(tiny_z_image_path))
    assert family is ZImage and ZImage.pipeline_class() is ZImagePipeline
    assert family.target_modules(["attention"]) == ["to_q", "to_k", "to_v", "to_out.0"]  # the script's default
    denoiser = load(tiny_z_image_path).denoiser
    add_lora(denoiser, rank=2, lora_alpha=2, target_modules=family.target_modules(["attention+ff"]))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in denoiser.named_parameters() if ".lora_A" in name}
    blocks = ("noise_refiner.0", "context_refiner.0", "layers.0", "layers.1")
    assert adapted == {f"{b}.{m}" for b in blocks for m in ("attention.to_q", "attention.to_k", "attention.to_v",
                                                            "attention.to_out.0", "feed_forward.w1",
                                                            "feed_forward.w2", "feed_forward.w3")}
