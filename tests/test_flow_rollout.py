"""The rollout on the flow-matching families (SD3/SD3.5 and FLUX.1, tiny random pipelines): the pipelines' own
images, sigmas and guidance, a hand-written flow-matching DRaFT+ step to agree with, the adapters-off reference
and the penalty, K > 1 and DRaFT-LV, and the rectified-flow identities."""

import copy

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor
from lora_fixtures import randomise_lora_B
from test_rollout import saved_bytes

from utils.families import Flux, StableDiffusion3, load_family
from utils.lora import add_lora
from utils.rollout.loop import Models, RolloutConfig, draftplus_step, kl_penalty, rollout
from utils.rollout.parametrisation import RectifiedFlow

PROMPTS = ["a red circle", "a blue square"]
SEQ = 16  # --max_sequence_length: short T5 sequences keep the tests fast
LATENT = (24, 16)  # 48x32 images (the tiny VAEs have factor 2): non-square
HEIGHT, WIDTH = 48, 32


def load(path, **options):
    family = load_family(str(path), max_sequence_length=SEQ, **options)
    for module in (family.vae, family.denoiser, *family.text_encoders):
        module.requires_grad_(False)  # frozen, as the trainer has them
    return family


def models_of(family):
    scheduler = type(family.pipe.scheduler).from_config(family.pipe.scheduler.config)  # the rollout's own
    return Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                  scheduler=scheduler)


def noise_for(family, batch=2, seed=0):
    return torch.randn(batch, family.latent_channels, *LATENT, generator=torch.Generator().manual_seed(seed))


def mean_red(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


def add_random_lora(family, seed=1):
    """LoRA on attention+ff, with lora_B away from its zero init (an adapter that changes the prediction)."""
    params = add_lora(family.denoiser, rank=4, lora_alpha=8,
                      target_modules=family.target_modules(["attention+ff"], family.denoiser.config))
    randomise_lora_B(family.denoiser, seed=seed)
    return params


# name -> (fixture, family options, guidance_scale, negative prompt, extra pipeline arguments)
CASES = {
    "flux-dev": ("tiny_flux_dev_path", {}, 3.5, "", {}),
    "flux-dev-true-cfg": ("tiny_flux_dev_path", {"true_cfg_scale": 2.0}, 3.5, "a green triangle",
                          {"true_cfg_scale": 2.0}),
    "flux-schnell": ("tiny_flux_schnell_path", {}, 0.0, "", {}),
    "sd3-cfg-negative": ("tiny_sd3_path", {}, 5.0, "a green triangle", {}),
    "sd3-unguided": ("tiny_sd3_path", {}, 1.0, "", {}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("final_latent", ["sample", "x0"])
def test_rollout_images_equal_the_pipelines(case, final_latent, request):
    """Same noise, same sigmas, same denoiser calls: the pipeline's images, bit for bit, at a non-square size.
    For rectified flow the last sigma is 0, so the final Euler step *is* x0 = x - sigma v: both agree."""
    fixture, options, guidance, negative, pipe_kwargs = CASES[case]
    family = load(request.getfixturevalue(fixture), **options)
    noise = noise_for(family)
    config = RolloutConfig(num_inference_steps=4, guidance_scale=guidance, final_latent=final_latent)
    with torch.no_grad():
        out = rollout(models_of(family), family.encode_prompts(PROMPTS, negative, config.guided), noise, config,
                      with_reference=False)
        latents = family.pack(noise) if isinstance(family, Flux) else noise  # FluxPipeline takes packed latents
        expected = family.pipe(PROMPTS, negative_prompt=[negative] * 2 if negative else None, latents=latents.clone(),
                               height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=guidance,
                               max_sequence_length=SEQ, output_type="pt", **pipe_kwargs).images
    assert out.images.shape == (2, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(out.images, expected, rtol=0, atol=0)


@pytest.mark.parametrize("fixture,guidance", [("tiny_flux_dev_path", 3.5), ("tiny_sd3_path", 5.0)])
def test_bf16_rollout_latents_equal_the_pipelines(fixture, guidance, request):
    """In bf16 too: FLUX's timestep is cast to the latents' dtype before / 1000 and every Euler step sums in
    fp32, as the pipelines do."""
    family = load_family(str(request.getfixturevalue(fixture)), dtype=torch.bfloat16, max_sequence_length=SEQ)
    noise = noise_for(family).bfloat16()
    config = RolloutConfig(num_inference_steps=4, guidance_scale=guidance)
    with torch.no_grad():
        out = rollout(models_of(family), family.encode_prompts(PROMPTS, "", config.guided), noise, config,
                      with_reference=False)
        packed = isinstance(family, Flux)
        expected = family.pipe(PROMPTS, latents=family.pack(noise) if packed else noise.clone(), height=HEIGHT,
                               width=WIDTH, num_inference_steps=4, guidance_scale=guidance, max_sequence_length=SEQ,
                               output_type="latent").images
    assert out.latents.dtype == torch.bfloat16
    assert torch.equal(family.pack(out.latents) if packed else out.latents, expected)


def test_sigma_schedules_are_the_pipelines(tiny_flux_dev_path, tiny_sd3_path):
    """FLUX: sigmas linspace(1, 1/T, T) under the exponential shift mu, linear in the packed token count;
    SD3: the scheduler's static shift 3. Both end at 0."""
    flux = load(tiny_flux_dev_path)
    scheduler = copy.deepcopy(flux.pipe.scheduler)
    flux.set_timesteps(scheduler, 4, LATENT)
    m = (1.15 - 0.5) / (4096 - 256)
    mu = (LATENT[0] // 2) * (LATENT[1] // 2) * m + 0.5 - m * 256
    t = np.linspace(1.0, 1 / 4, 4)
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), np.exp(mu) / (np.exp(mu) + (1 / t - 1)), rtol=1e-6)
    assert scheduler.sigmas[-1] == 0
    sd3 = load(tiny_sd3_path)
    scheduler = copy.deepcopy(sd3.pipe.scheduler)
    sd3.set_timesteps(scheduler, 4, LATENT)
    s = np.linspace(1.0, scheduler.sigma_min, 4)  # from sigma_max to the (shifted) sigma_min
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), 3 * s / (1 + 2 * s), rtol=1e-6)
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)


def test_sd3_dynamic_shift_sigmas_are_the_pipelines_on_a_non_square_image(tiny_sd3_path):
    """An SD3 model whose scheduler shifts by the image's token count (use_dynamic_shifting): mu from height x
    width patches, as StableDiffusion3Pipeline computes it (a non-square size tells height from width)."""
    sd3 = load(tiny_sd3_path)
    sd3.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        sd3.pipe.scheduler.config, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    ours = copy.deepcopy(sd3.pipe.scheduler)
    sd3.set_timesteps(ours, 4, LATENT)
    seen = []

    def capture(pipe, step, t, kwargs):
        seen.append(pipe.scheduler.sigmas.clone())
        return kwargs

    with torch.no_grad():
        sd3.pipe(PROMPTS[:1], height=HEIGHT, width=WIDTH, num_inference_steps=4, max_sequence_length=SEQ,
                 output_type="latent", callback_on_step_end=capture)
    square = copy.deepcopy(sd3.pipe.scheduler)
    sd3.set_timesteps(square, 4, (LATENT[0], LATENT[0]))
    assert not torch.allclose(square.sigmas, seen[0])  # the token count moves the schedule
    torch.testing.assert_close(ours.sigmas, seen[0])


def guidance_seen(family, guidance_scale):
    seen = []
    hook = family.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("guidance")), with_kwargs=True)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=guidance_scale, final_latent="sample")
    try:
        with torch.no_grad():
            images = rollout(models_of(family), family.encode_prompts(PROMPTS, "", config.guided), noise_for(family),
                             config, with_reference=False).images
    finally:
        hook.remove()
    return seen, images


def test_flux_dev_guidance_reaches_the_transformer_and_schnell_gets_none(tiny_flux_dev_path, tiny_flux_schnell_path):
    dev = load(tiny_flux_dev_path)
    seen, images = guidance_seen(dev, 3.5)
    assert len(seen) == 3 and all(g is not None and g.tolist() == [3.5, 3.5] for g in seen)  # one pass per step
    assert not torch.equal(images, guidance_seen(dev, 1.0)[1])  # the distilled guidance acts
    schnell = load(tiny_flux_schnell_path)
    assert guidance_seen(schnell, 3.5)[0] == [None] * 3


def test_sd3_guided_calls_share_one_batched_conditioning(tiny_sd3_path):
    """SD3's [uncond, cond] prompt embeddings are concatenated once per batch, not again at every denoiser call."""
    family = load(tiny_sd3_path)
    cond = family.encode_prompts(PROMPTS, "", guided=True)
    seen = []
    hook = family.denoiser.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["encoder_hidden_states"], kw["pooled_projections"])), with_kwargs=True)
    rollout(models_of(family), cond, noise_for(family), RolloutConfig(num_inference_steps=3, guidance_scale=5.0),
            with_reference=False)
    hook.remove()
    assert len(seen) == 3 and all(a is seen[0][0] and b is seen[0][1] for a, b in seen)
    torch.testing.assert_close(seen[0][0], torch.cat([cond.uncond["encoder_hidden_states"],
                                                      cond.cond["encoder_hidden_states"]]), rtol=0, atol=0)
    torch.testing.assert_close(seen[0][1], torch.cat([cond.uncond["pooled_projections"],
                                                      cond.cond["pooled_projections"]]), rtol=0, atol=0)


# ------------------------------------------------------------- hand-written DRaFT+ steps (no family code)


def euler_rollout_by_hand(tr, scheduler, x, v_at):
    """The no-grad Euler steps of `scheduler` from x but the last, then the last step's guided velocity `v_at(x, t)`
    with the adapters of the transformer `tr` on (graded) and off (the reference): (x, its sigma, v, v_ref)."""
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            x = scheduler.step(v_at(x, t), t, x).prev_sample
    t = scheduler.timesteps[-1]
    v = v_at(x, t)
    with torch.no_grad():
        tr.disable_adapters()
        v_ref = v_at(x, t)
        tr.enable_adapters()
    return x, scheduler.sigmas[-2], v, v_ref


def hand_flux_step(pipe, noise, steps, guidance, kl_coeff):
    """FLUX-dev DRaFT+ by hand: pack, dynamic shift, no-grad Euler prefix, graded last step, x0 decode,
    the penalty on the implied noises of the adapters-on and -off guided velocities."""
    tr, vae = pipe.transformer, pipe.vae
    embeds, pooled, txt_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=SEQ)
    b, c, h, w = noise.shape
    x = noise.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    ids = ids.reshape(-1, 3)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    m = (1.15 - 0.5) / (4096 - 256)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=(h * w // 4) * m + 0.5 - m * 256)
    guide = torch.full((b,), guidance)

    def v_at(x, t):
        return tr(hidden_states=x, timestep=t.expand(b) / 1000, guidance=guide, pooled_projections=pooled,
                  encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]

    x, sigma, v, v_ref = euler_rollout_by_hand(tr, scheduler, x, v_at)
    penalty = ((x + (1 - sigma) * v) - (x + (1 - sigma) * v_ref)).pow(2).mean()
    x0 = (x - sigma * v).view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    images = vae.decode(x0 / vae.config.scaling_factor + vae.config.shift_factor).sample
    return -mean_red((images / 2 + 0.5).clamp(0, 1), PROMPTS).mean() + kl_coeff * penalty


def hand_sd3_step(pipe, noise, steps, guidance, kl_coeff):
    """SD3 DRaFT+ by hand: CFG on [uncond, cond], static shift, graded last step, x0 decode."""
    tr, vae = pipe.transformer, pipe.vae
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                             max_sequence_length=SEQ)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)

    def v_at(x, t):
        out = tr(hidden_states=torch.cat([x, x]), timestep=t.expand(2 * len(x)),
                 encoder_hidden_states=torch.cat([uncond, cond]), pooled_projections=torch.cat([uncond_pooled, pooled]),
                 return_dict=False)[0]
        u, c = out.chunk(2)
        return u + guidance * (c - u)

    x, sigma, v, v_ref = euler_rollout_by_hand(tr, scheduler, noise, v_at)
    penalty = (v - v_ref).mul(1 - sigma).pow(2).mean()  # (1 - sigma)^2 times the velocity MSE
    images = vae.decode((x - sigma * v) / vae.config.scaling_factor + vae.config.shift_factor).sample
    return -mean_red((images / 2 + 0.5).clamp(0, 1), PROMPTS).mean() + kl_coeff * penalty


@pytest.mark.parametrize("name", ["flux-dev", "sd3"])
def test_lora_gradient_equals_a_hand_written_flow_draftplus_step(name, request):
    fixture, hand, guidance = {"flux-dev": ("tiny_flux_dev_path", hand_flux_step, 3.5),
                               "sd3": ("tiny_sd3_path", hand_sd3_step, 5.0)}[name]
    family = load(request.getfixturevalue(fixture))
    params = add_random_lora(family)
    noise = noise_for(family)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=guidance)
    loss, _, penalty = draftplus_step(models_of(family), mean_red, PROMPTS, noise, config, kl_coeff=0.5)
    assert penalty > 0  # the LoRA moved the prediction
    grads = torch.autograd.grad(loss, params)
    hand_loss = hand(family.pipe, noise, 3, guidance, 0.5)
    torch.testing.assert_close(loss, hand_loss, rtol=1e-5, atol=1e-6)
    names = [n for n, p in family.denoiser.named_parameters() if p.requires_grad]
    # SD3's last block is context-pre-only: its text queries (add_q_proj) reach no output
    last = len(family.denoiser.transformer_blocks) - 1
    dead = {n for n in names if n.startswith(f"transformer_blocks.{last}.") and ".add_q_proj." in n} \
        if isinstance(family, StableDiffusion3) else set()
    assert {n for n, g in zip(names, grads, strict=True) if g.abs().sum() == 0} == dead
    for g, h in zip(grads, torch.autograd.grad(hand_loss, params), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------- the reference pass and the penalty


def last_step_input(family, config, noise, cond):
    """x_t of the last step, by the rollout's own no-grad prefix (the hand-written steps above check it)."""
    steps = family.parametrisation(type(family.pipe.scheduler).from_config(family.pipe.scheduler.config), config,
                                   LATENT, "cpu")
    x = steps.initial_latents(noise)
    with torch.no_grad():
        for i in range(len(steps) - 1):
            x = steps.step(family.predict(family.denoiser, x, steps.timesteps[i], cond, config.guidance_scale), i, x)
    return x, steps.timesteps[-1], steps.sigmas[-2]


@pytest.mark.parametrize("fixture,guidance,other", [("tiny_flux_dev_path", 3.5, 1.0), ("tiny_sd3_path", 5.0, 1.0)])
def test_reference_is_the_guided_prediction_of_the_adapters_off_transformer(fixture, guidance, other, request):
    """eps_ref = x_t + (1 - sigma) v_base(x_t), v_base the guided velocity of the same transformer with its
    adapters disabled (the base model), on the very x_t of the graded step; the penalty is the mean squared
    difference of the implied noises, (1 - sigma)^2 times the velocities'."""
    family = load(request.getfixturevalue(fixture))
    base = copy.deepcopy(family.denoiser)
    add_random_lora(family)
    noise = noise_for(family)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=guidance)
    cond = family.encode_prompts(PROMPTS, "", config.guided)
    out = rollout(models_of(family), cond, noise, config, with_reference=True)
    x_t, t, sigma = last_step_input(family, config, noise, cond)
    with torch.no_grad():
        v_base = family.predict(base, x_t, t, cond, guidance)
        v_lora = family.predict(family.denoiser, x_t, t, cond, guidance)
        v_other = family.predict(base, x_t, t, cond, other)  # unguided (SD3) / another distilled guidance (FLUX)
    torch.testing.assert_close(out.eps_ref[0], x_t + (1 - sigma) * v_base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.eps[0].detach(), x_t + (1 - sigma) * v_lora, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(v_base, v_other, atol=1e-4)  # the guidance is part of the reference
    assert (v_lora - v_base).abs().max() > 1e-3
    penalty = kl_penalty(out.eps, out.eps_ref)
    torch.testing.assert_close(penalty, (1 - sigma) ** 2 * (v_lora - v_base).pow(2).mean(), rtol=1e-4, atol=1e-9)
    assert all(p.requires_grad for n, p in family.denoiser.named_parameters() if "lora" in n)  # adapters back on


def test_k2_and_draft_lv_give_gradients_and_shapes(tiny_flux_dev_path):
    family = load(tiny_flux_dev_path)
    params = add_random_lora(family)
    noise = noise_for(family)
    for config, images, graded in ((RolloutConfig(num_inference_steps=3, guidance_scale=3.5, truncation_steps=2), 2, 2),
                                   (RolloutConfig(num_inference_steps=3, guidance_scale=3.5, lv_samples=3), 6, 1)):
        cond = family.encode_prompts(PROMPTS, "", config.guided)
        out = rollout(models_of(family), cond, noise, config, generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (images, 3, HEIGHT, WIDTH) and len(out.eps) == len(out.eps_ref) == graded
        grads = torch.autograd.grad(out.images[:, 0].mean(), params, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_draft_lv_renoises_x0_to_the_last_sigma(tiny_sd3_path):
    """x_sigma = (1 - sigma) sg(x0) + sigma eps with fresh noise per copy, at the last step's sigma and timestep."""
    family = load(tiny_sd3_path)
    add_random_lora(family)
    noise, n = noise_for(family), 3
    config = RolloutConfig(num_inference_steps=3, guidance_scale=5.0)
    cond = family.encode_prompts(PROMPTS, "", config.guided)
    with torch.no_grad():
        x0 = rollout(models_of(family), cond, noise, config, with_reference=False).latents
    calls = []
    hook = family.denoiser.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw["hidden_states"].detach(), kw["timestep"])), with_kwargs=True)
    out = rollout(models_of(family), cond, noise, RolloutConfig(num_inference_steps=3, guidance_scale=5.0, lv_samples=n),
                  generator=torch.Generator().manual_seed(5))
    hook.remove()
    assert len(calls) == 3 + 2 and out.repeats == n  # the full no-grad rollout, the graded call, the reference
    graded_input, t = calls[3]
    scheduler = copy.deepcopy(family.pipe.scheduler)
    family.set_timesteps(scheduler, 3, LATENT)
    sigma = scheduler.sigmas[-2]
    fresh = randn_tensor((2 * n, *x0.shape[1:]), generator=torch.Generator().manual_seed(5))
    expected = (1 - sigma) * x0.repeat_interleave(n, dim=0) + sigma * fresh
    torch.testing.assert_close(graded_input, torch.cat([expected, expected]))  # CFG: uncond and cond halves
    assert torch.equal(t, scheduler.timesteps[-1].expand(4 * n))
    assert not torch.allclose(out.images[0], out.images[1])  # independent re-noising per copy


@pytest.mark.parametrize("fixture", ["tiny_flux_dev_path", "tiny_sd3_path"])
def test_t5_runs_once_without_grad_and_checkpointing_saves_memory_with_the_same_gradients(fixture, request):
    """One step encodes its prompts once, T5 under no_grad; checkpointing the transformer and the VAE
    decoder (the trainer keeps them in eval mode) keeps less for backward and gives the same gradients."""
    family = load(request.getfixturevalue(fixture))
    t5 = family.text_encoders[-1]
    params = add_random_lora(family)
    calls = []
    hook = t5.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    config = RolloutConfig(num_inference_steps=3, guidance_scale=3.5, truncation_steps=2)

    def step():
        return draftplus_step(models_of(family), mean_red, PROMPTS, noise_for(family), config, kl_coeff=1.0)

    try:
        plain_bytes, (loss, _, _) = saved_bytes(step)
        passes = 2 if isinstance(family, StableDiffusion3) else 1  # SD3's encode_prompt: prompts, then negatives
        assert calls == [False] * passes  # once for the batch, without autograd
        plain = torch.autograd.grad(loss, params)
        family.denoiser.enable_gradient_checkpointing()
        family.vae.enable_gradient_checkpointing()
        assert not family.denoiser.training and not family.vae.training
        ckpt_bytes, (loss_ckpt, _, _) = saved_bytes(step)
    finally:
        hook.remove()
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)
    for a, b in zip(plain, torch.autograd.grad(loss_ckpt, params), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------- the rectified-flow identities


def test_flow_identities_recover_x0_and_noise():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    steps = RectifiedFlow(scheduler)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 6, 4, generator=g), torch.randn(2, 16, 6, 4, generator=g)
    sigma = steps.sigmas[1]
    x_t = steps.renoise(x0, eps, 1)
    torch.testing.assert_close(x_t, (1 - sigma) * x0 + sigma * eps)
    v = eps - x0  # the rectified-flow velocity target
    torch.testing.assert_close(steps.to_x0(v, x_t, 1), x0)
    torch.testing.assert_close(steps.to_epsilon(v, x_t, 1), eps)


def test_last_euler_step_is_x0_in_bfloat16_too():
    """The sampler's step in the model dtype (fp32 sum, cast back) to the terminal sigma 0 and the x0
    prediction agree bit for bit, so `--final_latent` x0 and sample are the same rollout for flow models."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    steps = RectifiedFlow(scheduler)
    g = torch.Generator().manual_seed(0)
    x, v = (torch.randn(1, 16, 6, 4, generator=g).bfloat16() for _ in range(2))
    scheduler.set_begin_index(3)
    sample = scheduler.step(v, scheduler.timesteps[3], x).prev_sample
    assert sample.dtype == torch.bfloat16
    assert torch.equal(sample, steps.to_x0(v, x, 3))


def test_the_families_serve_their_pipeline_classes():
    assert Flux.pipeline_class() is FluxPipeline and StableDiffusion3.pipeline_class() is StableDiffusion3Pipeline
