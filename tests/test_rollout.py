"""The DRaFT+ step on a tiny random SD model: values, gradients, reference pass, K>1 and DRaFT-LV,
every sampler on epsilon and v-prediction models, and a hand-written NeMo-style step to agree with."""

import copy

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from lora_fixtures import randomise_lora_B

from utils.families import load_family
from utils.lora import adapters_disabled, add_lora
from utils.rollout.loop import Models, RolloutConfig, decode, draftplus_step, kl_penalty, rollout
from utils.rollout.parametrisation import alpha_bar, to_epsilon, to_x0

PROMPTS = ["a red circle", "a blue square"]


def mean_red(images, prompts):
    """A tiny differentiable reward: mean of the red channel (enough to make gradients flow)."""
    return images[:, 0].mean(dim=(1, 2))


def make_models(path, scheduler: str | None = None):
    family = load_family(str(path))
    pipe = family.pipe
    for module in (pipe.vae, *family.text_encoders):
        module.requires_grad_(False)  # frozen, as the trainer has them
    base_unet = copy.deepcopy(pipe.unet)  # pristine copy, only for comparisons
    params = add_lora(pipe.unet, rank=4, lora_alpha=8)
    randomise_lora_B(pipe.unet)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    train_scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    m = Models(family=family, denoiser=pipe.unet, raw_denoiser=pipe.unet, vae=pipe.vae, scheduler=train_scheduler)
    return m, params, base_unet, pipe


@pytest.fixture()
def models(tiny_sd_path):
    return make_models(tiny_sd_path)


def noise(batch=2, seed=0, size=(16, 16)):
    return torch.randn(batch, 4, *size, generator=torch.Generator().manual_seed(seed))


def pipeline_images(pipe, z, steps, guidance, **kw):
    with torch.no_grad():
        return pipe(PROMPTS, latents=z.clone(), num_inference_steps=steps, guidance_scale=guidance,
                    height=z.shape[-2] * pipe.vae_scale_factor, width=z.shape[-1] * pipe.vae_scale_factor,
                    output_type="pt", **kw).images


# ------------------------------------------------------------------------------------ noise levels


def test_kl_penalty_matches_hand_computation():
    eps = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])]
    ref = [torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])]
    # step 1: (0 + 4 + 0 + 4) / 4 = 2; step 2: (1 + 1 + 1 + 0) / 4 = 0.75; mean over steps = 1.375
    assert kl_penalty(eps, ref).item() == pytest.approx(1.375)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_eps_and_x0_are_recovered_whatever_the_model_predicts(prediction_type):
    """DRaFT+ penalises eps_theta - eps_ref: v- and x0-predicting models are converted to eps first."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a = torch.tensor(0.37, dtype=torch.float64)
    x_t = a.sqrt().float() * x0 + (1 - a).sqrt().float() * eps
    output = {"epsilon": eps, "v_prediction": a.sqrt().float() * eps - (1 - a).sqrt().float() * x0,
              "sample": x0}[prediction_type]
    torch.testing.assert_close(to_epsilon(prediction_type, output, x_t, a), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(to_x0(prediction_type, output, x_t, a), x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                                  "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_alpha_bar_is_read_by_step_for_discrete_and_sigma_schedulers(tiny_sd_path, name):
    """One helper for both parametrisations: sigma schedulers (float timesteps for Euler) agree with
    alphas_cumprod at the same timestep, and never index it with a float."""
    config = diffusers.DDIMScheduler.load_config(tiny_sd_path, subfolder="scheduler")
    scheduler = getattr(diffusers, name).from_config(config)
    scheduler.set_timesteps(7)
    for i, t in enumerate(scheduler.timesteps):
        expected = scheduler.alphas_cumprod[int(round(float(t)))].double()
        assert alpha_bar(scheduler, i).item() == pytest.approx(expected.item(), rel=1e-5), (i, float(t))


def test_final_x0_carries_nemos_gradient_scale_and_the_scheduler_sample_does_not():
    """SD's DDIM (set_alpha_to_one: false) ends at alpha_0 = 0.99915: its last prev_sample moves only
    -0.0121 per unit of eps, against -0.0413 for the x0 prediction NeMo-Aligner decodes (0.29x)."""
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(50)
    last, t = 49, scheduler.timesteps[-1]
    x_t = torch.zeros(1)
    eps = torch.zeros(1, requires_grad=True)
    (d_sample,) = torch.autograd.grad(scheduler.step(eps, t, x_t).prev_sample.sum(), eps)
    (d_x0,) = torch.autograd.grad(to_x0("epsilon", eps, x_t, alpha_bar(scheduler, last)).sum(), eps)
    assert d_sample.item() == pytest.approx(-0.0121, abs=2e-4)
    assert d_x0.item() == pytest.approx(-0.0413, abs=2e-4)
    assert d_sample.item() / d_x0.item() == pytest.approx(0.29, abs=0.01)


# ------------------------------------------------------------------------------------ the rollout


def test_rollout_with_final_sample_matches_diffusers_pipeline(models):
    """Forward values of the training rollout are exactly what the diffusers pipeline samples."""
    m, _, _, pipe = models
    z = noise()
    config = RolloutConfig(num_inference_steps=4, guidance_scale=5.0, truncation_steps=2, final_latent="sample")
    cond = m.family.encode_prompts(PROMPTS, guided=True)
    with torch.no_grad():
        ours = rollout(m, cond, z, config, with_reference=False).images
    torch.testing.assert_close(ours, pipeline_images(pipe, z, 4, 5.0), atol=1e-5, rtol=1e-5)


def test_default_final_latent_decodes_the_models_x0_prediction(models):
    m, _, _, _ = models
    z = noise()
    cond = m.family.encode_prompts(PROMPTS)
    with torch.no_grad():
        sample = rollout(m, cond, z, RolloutConfig(num_inference_steps=4, guidance_scale=3.0,
                                                                            final_latent="sample"), with_reference=False)
        x0 = rollout(m, cond, z, RolloutConfig(num_inference_steps=4, guidance_scale=3.0),
                     with_reference=False)
    torch.testing.assert_close(x0.images, decode(m.vae, x0.latents))
    # DDIM's final sample sits at alpha_0 = 0.99915, close to but not at the x0 prediction
    assert 0 < (x0.latents - sample.latents).abs().max() < 0.2


def nemo_style_loss(m, pipe, z, steps, guidance, K, kl_coeff, reward):
    """An independent DRaFT+ step written as NeMo-Aligner's: a no-grad DDIM prefix, K graded steps with the
    guided eps of the LoRA UNet and of the same UNet with adapters off, the last one's x0 prediction
    decoded, loss = -mean r + kl_coeff * mean_k mean (eps - eps_ref)^2."""
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    tok = pipe.tokenizer

    def embed(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    with torch.no_grad():
        context = torch.cat([embed([""] * len(PROMPTS)), embed(PROMPTS)])

    def guided_eps(x, t):
        uncond, cond = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        return uncond + guidance * (cond - uncond)

    x = z.clone()
    with torch.no_grad():
        for t in scheduler.timesteps[: steps - K]:
            x = scheduler.step(guided_eps(x, t), t, x).prev_sample
    penalties = []
    for j, t in enumerate(scheduler.timesteps[steps - K:]):
        eps = guided_eps(x, t)
        with torch.no_grad():
            pipe.unet.disable_adapters()
            eps_ref = guided_eps(x, t)
            pipe.unet.enable_adapters()
        penalties.append(((eps - eps_ref) ** 2).mean())
        if j == K - 1:
            a = scheduler.alphas_cumprod[t]
            x = (x - (1 - a).sqrt() * eps) / a.sqrt()
        else:
            x = scheduler.step(eps, t, x).prev_sample
    images = (pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    return -reward(images, PROMPTS).mean() + kl_coeff * torch.stack(penalties).mean()


@pytest.mark.parametrize("K", [1, 2])
def test_lora_gradient_equals_a_hand_written_nemo_style_step(models, K):
    m, params, _, pipe = models
    z = noise()
    config = RolloutConfig(num_inference_steps=4, guidance_scale=3.0, truncation_steps=K)
    loss, _, _ = draftplus_step(m, mean_red, PROMPTS, z, config, kl_coeff=0.7)
    ours = torch.autograd.grad(loss, params)
    reference_loss = nemo_style_loss(m, pipe, z, 4, 3.0, K, 0.7, mean_red)
    theirs = torch.autograd.grad(reference_loss, params)
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    assert sum(g.abs().sum() for g in ours) > 0


def hand_prefix(m, z, steps, guidance):
    """By hand: the no-grad DDIM prefix with the LoRA UNet up to the last step; returns (x_t, t, guided)."""
    cond = m.family.encode_prompts(PROMPTS)
    scheduler = m.scheduler.__class__.from_config(m.scheduler.config)
    scheduler.set_timesteps(steps)

    def guided(unet, x, t):
        uncond, text = unet(torch.cat([x, x]), t, encoder_hidden_states=cond.encoder_hidden_states).sample.chunk(2)
        return uncond + guidance * (text - uncond)

    x = z.clone()
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            x = scheduler.step(guided(m.denoiser, x, t), t, x).prev_sample
    return x, scheduler.timesteps[-1], guided


def test_penalty_alone_gives_the_lora_the_hand_computed_gradient(models):
    """A penalty detached from the graph would silently turn DRaFT+ into DRaFT."""
    m, params, base_unet, _ = models
    z = noise()
    config = RolloutConfig(num_inference_steps=3, guidance_scale=3.0)
    loss, _, penalty = draftplus_step(m, lambda images, prompts: images.new_zeros(len(images)), PROMPTS, z,
                                      config, kl_coeff=2.0)
    ours = torch.autograd.grad(loss, params)
    # by hand: the prefix with the LoRA UNet, then 2 * mean (eps_lora - eps_base)^2 at the last step
    x, t, guided = hand_prefix(m, z, 3, 3.0)
    with torch.no_grad():
        reference = guided(base_unet, x, t)
    hand = 2.0 * (guided(m.denoiser, x, t) - reference).pow(2).mean()
    assert penalty.item() == pytest.approx(hand.item() / 2.0, rel=1e-5) and hand.item() > 0
    for a, b in zip(ours, torch.autograd.grad(hand, params), strict=True):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-4)
    assert sum(g.abs().sum() for g in ours) > 0


def test_reference_is_the_guided_prediction_of_the_adapters_off_unet(models):
    m, _, base_unet, _ = models
    z = noise()
    config = RolloutConfig(num_inference_steps=3, guidance_scale=4.0)
    cond = m.family.encode_prompts(PROMPTS)
    out = rollout(m, cond, z, config, with_reference=True)
    x, t, guided = hand_prefix(m, z, 3, 4.0)
    with torch.no_grad():
        expected = guided(base_unet, x, t)
        conditional = base_unet(x, t, encoder_hidden_states=cond.encoder_hidden_states[len(PROMPTS):]).sample
    torch.testing.assert_close(out.eps_ref[0], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out.eps_ref[0], conditional)  # the unguided prediction is another thing


def test_negative_prompt_reaches_the_rollout(models):
    m, _, _, pipe = models
    z = noise()
    config = RolloutConfig(num_inference_steps=3, guidance_scale=5.0, final_latent="sample")
    seen = []

    def spy(images, prompts):
        seen.append(images.detach())
        return mean_red(images, prompts)

    with torch.no_grad():
        draftplus_step(m, spy, PROMPTS, z, config, kl_coeff=0.0, negative_prompt="a blue square")
        draftplus_step(m, spy, PROMPTS, z, config, kl_coeff=0.0)
    expected = pipeline_images(pipe, z, 3, 5.0, negative_prompt=["a blue square"] * 2)
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen[0], seen[1], atol=1e-4)


def test_adapters_disabled_equals_base_unet_exactly(models):
    m, _, base_unet, _ = models
    x, t = noise(), torch.tensor(500)
    cond = m.family.encode_prompts(PROMPTS, guided=False).encoder_hidden_states
    with torch.no_grad():
        with_lora = m.denoiser(x, t, encoder_hidden_states=cond).sample
        with adapters_disabled(m.denoiser):
            disabled = m.denoiser(x, t, encoder_hidden_states=cond).sample
        base = base_unet(x, t, encoder_hidden_states=cond).sample
    assert torch.equal(disabled, base)
    assert not torch.allclose(with_lora, base)  # the adapter is active again afterwards
    assert all(p.requires_grad for n, p in m.denoiser.named_parameters() if "lora" in n)


def test_one_step_gives_every_lora_param_a_gradient_and_leaves_base_frozen(models):
    m, params, _, _ = models
    base_before = {n: p.detach().clone() for n, p in m.denoiser.named_parameters() if "lora" not in n}
    lora_before = [p.detach().clone() for p in params]
    config = RolloutConfig(num_inference_steps=3, guidance_scale=3.0)
    loss, rewards, penalty = draftplus_step(m, mean_red, PROMPTS, noise(), config, kl_coeff=1.0)
    loss.backward()
    assert len(params) > 0 and penalty.item() > 0
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    torch.optim.SGD(params, lr=1.0).step()
    for n, p in m.denoiser.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base_before[n]), n
            assert p.grad is None
    assert all(not torch.equal(p, b) for p, b in zip(params, lora_before))
    for module in (m.vae, *m.family.text_encoders):
        assert all(p.grad is None for p in module.parameters())


def test_loss_is_reward_plus_weighted_penalty_and_kl0_is_plain_draft(models):
    m, params, _, _ = models
    config = RolloutConfig(num_inference_steps=3, guidance_scale=3.0)
    loss, rewards, penalty = draftplus_step(m, mean_red, PROMPTS, noise(), config, kl_coeff=0.5)
    assert loss.item() == pytest.approx(-rewards.mean().item() + 0.5 * penalty.item(), rel=1e-6)

    # kl_coeff = 0: no reference pass at all, loss is exactly -mean reward, same images and gradients
    # as the reward term alone of a DRaFT+ step.
    calls = []
    m.denoiser.disable_adapters = lambda: calls.append(1)
    loss0, rewards0, penalty0 = draftplus_step(m, mean_red, PROMPTS, noise(), config, kl_coeff=0.0)
    del m.denoiser.disable_adapters
    assert calls == [] and penalty0.item() == 0.0
    assert loss0.item() == pytest.approx(-rewards0.mean().item())
    torch.testing.assert_close(rewards0, rewards)
    grads0 = torch.autograd.grad(loss0, params)
    reward_only = -mean_red(rollout(m, m.family.encode_prompts(PROMPTS), noise(), config,
                                    with_reference=False).images, PROMPTS).mean()
    for g0, g in zip(grads0, torch.autograd.grad(reward_only, params)):
        torch.testing.assert_close(g0, g)


def test_reward_runs_outside_the_unet_autocast(models):
    """Mixed precision is for the UNet/VAE; the reward keeps its own dtype (--reward_dtype, fp32 by default)."""
    m, _, _, _ = models
    seen = []

    def spy(images, prompts):
        seen.append((torch.is_autocast_enabled("cpu"), images.dtype))
        return mean_red(images, prompts)

    config = RolloutConfig(num_inference_steps=2, guidance_scale=3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = draftplus_step(m, spy, PROMPTS, noise(), config, kl_coeff=0.1)
    assert seen == [(False, torch.float32)]
    assert torch.isfinite(loss)


def test_draft_lv_renoises_x0_to_the_last_steps_noise_level(models):
    m, params, _, _ = models
    n = 3
    z = noise()
    cond = m.family.encode_prompts(PROMPTS)
    with torch.no_grad():  # x0 of the same no-grad rollout: what a K=1 rollout decodes
        x0 = rollout(m, cond, z, RolloutConfig(num_inference_steps=4, guidance_scale=3.0),
                     with_reference=False).latents
    calls = []
    hook = m.denoiser.register_forward_pre_hook(lambda _, args: calls.append((args[0].detach(), args[1])))
    config = RolloutConfig(num_inference_steps=4, guidance_scale=3.0, lv_samples=n)
    out = rollout(m, cond, z, config, generator=torch.Generator().manual_seed(5))
    hook.remove()
    assert out.repeats == n and out.images.shape == (2 * n, 3, 32, 32)
    assert len(out.eps) == len(out.eps_ref) == 1 and out.eps[0].shape == (2 * n, 4, 16, 16)
    assert len(calls) == 4 + 2  # the full no-grad rollout, then the graded call and the reference
    graded_input, t = calls[4]
    last_t = m.scheduler.timesteps[-1]
    a = m.scheduler.alphas_cumprod[last_t]
    fresh = randn_tensor((2 * n, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    expected = a.sqrt() * x0.repeat_interleave(n, dim=0) + (1 - a).sqrt() * fresh
    assert t == last_t
    torch.testing.assert_close(graded_input[: 2 * n], expected, atol=1e-6, rtol=1e-5)  # uncond half
    torch.testing.assert_close(graded_input[2 * n:], expected, atol=1e-6, rtol=1e-5)  # cond half
    assert not torch.allclose(out.images[0], out.images[1])  # independent re-noising per copy
    loss, _, penalty = draftplus_step(m, mean_red, PROMPTS, z, config, kl_coeff=1.0,
                                      generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert penalty.item() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_draft_lv_refuses_the_schedulers_final_sample():
    """The LV step re-noises x0 outside the trajectory, so a multistep scheduler's history (DPM-Solver++, PLMS)
    does not belong to it: only the x0 prediction is defined for every sampler."""
    with pytest.raises(ValueError, match="lv_samples"):
        RolloutConfig(num_inference_steps=4, lv_samples=2, final_latent="sample")
    assert RolloutConfig(num_inference_steps=4, lv_samples=2).final_latent == "x0"


# ------------------------------------------------------------------------------------ LoRA dropout


def lora_dropouts(unet):
    return [m for name, m in unet.named_modules() if ".lora_dropout." in name]


def dropout_models(path):
    """The LoRA UNet as the trainer builds it: modules in eval mode before add_lora, dropout 0.5."""
    family = load_family(str(path))
    for module in (family.vae, family.denoiser, *family.text_encoders):
        module.requires_grad_(False).eval()
    params = add_lora(family.denoiser, rank=4, lora_alpha=8, lora_dropout=0.5)
    randomise_lora_B(family.denoiser)
    scheduler = family.pipe.scheduler.__class__.from_config(family.pipe.scheduler.config)
    return Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae, scheduler=scheduler), params


def test_lora_dropout_acts_in_the_graded_calls_only(tiny_sd_path):
    """The no-grad prefix, the adapters-off reference and validation renders are the model itself;
    dropout regularises the gradient-carrying call and nothing else."""
    m, _ = dropout_models(tiny_sd_path)
    assert len(lora_dropouts(m.denoiser)) > 0 and not any(d.training for d in lora_dropouts(m.denoiser))
    z = noise()
    cond = m.family.encode_prompts(PROMPTS)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=3.0)
    with torch.no_grad():  # a rollout without gradients is deterministic: no dropout anywhere
        a, b = (rollout(m, cond, z, config, with_reference=False).images for _ in range(2))
    assert torch.equal(a, b)
    calls = []
    hook = m.denoiser.register_forward_pre_hook(lambda _, args: calls.append(args[0].detach()))
    first, second = (rollout(m, cond, z, config) for _ in range(2))
    hook.remove()
    assert torch.equal(calls[2], calls[6])  # the graded step's input: the prefix is deterministic
    assert torch.equal(first.eps_ref[0], second.eps_ref[0])  # so is the reference
    assert not torch.allclose(first.eps[0], second.eps[0])  # the graded call draws its own dropout masks
    with torch.no_grad():  # the same graded step without gradients: the dropout-free prediction
        no_dropout = rollout(m, cond, z, config).eps[0]
    assert not torch.allclose(first.eps[0], no_dropout)
    render = lambda: pipeline_images(m.family.pipe, z, 3, 3.0)  # noqa: E731  (validation renders this way)
    assert torch.equal(render(), render())


def test_gradient_checkpointing_replays_the_graded_calls_lora_dropout(tiny_sd_path):
    """Checkpointing recomputes the graded call in backward, after the rollout returned: its dropout must
    draw the same masks then (a dropout switched on only around the forward call would not)."""
    m, params = dropout_models(tiny_sd_path)
    config = RolloutConfig(num_inference_steps=2, guidance_scale=3.0)

    def grads():
        torch.manual_seed(0)
        loss, _, _ = draftplus_step(m, mean_red, PROMPTS, noise(), config, kl_coeff=1.0)
        return torch.autograd.grad(loss, params)

    plain = grads()
    m.denoiser.enable_gradient_checkpointing()
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    torch.manual_seed(1)  # other masks, another gradient: dropout is on in the graded call
    other = torch.autograd.grad(draftplus_step(m, mean_red, PROMPTS, noise(), config, kl_coeff=1.0)[0], params)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, other))


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for backward while fn runs (and fn's result)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def test_gradient_checkpointing_saves_memory_and_gives_the_same_gradients(models):
    """As the trainer runs it (modules in eval mode): checkpointing must be active and exact."""
    m, params, _, _ = models
    config = RolloutConfig(num_inference_steps=3, guidance_scale=3.0, truncation_steps=2)
    step = lambda: draftplus_step(m, mean_red, PROMPTS, noise(), config, kl_coeff=1.0)  # noqa: E731
    plain_bytes, (loss, _, _) = saved_bytes(step)
    plain = torch.autograd.grad(loss, params)
    m.denoiser.enable_gradient_checkpointing()
    m.vae.enable_gradient_checkpointing()
    assert not m.denoiser.training and not m.vae.training
    ckpt_bytes, (loss_ckpt, _, _) = saved_bytes(step)
    assert ckpt_bytes < 0.5 * plain_bytes
    for a, b in zip(plain, torch.autograd.grad(loss_ckpt, params)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------ samplers

DETERMINISTIC = ("DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler")
STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler")


@pytest.mark.slow
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler_name", DETERMINISTIC + STOCHASTIC)
def test_every_sampler_and_prediction_type_trains(tiny_sd_path, tiny_sd_v_path, scheduler_name, prediction_type):
    """Finite, non-zero LoRA gradients from reward and penalty, on every sampler the trainer offers; the
    deterministic ones also roll out exactly as the diffusers pipeline samples."""
    m, params, _, pipe = make_models(tiny_sd_path if prediction_type == "epsilon" else tiny_sd_v_path,
                                     scheduler_name)
    z = noise()
    config = RolloutConfig(num_inference_steps=4, guidance_scale=5.0, truncation_steps=2, final_latent="sample")
    loss, _, penalty = draftplus_step(m, mean_red, PROMPTS, z, config, kl_coeff=1.0,
                                      generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(loss, params)
    assert penalty.item() > 0 and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    default = RolloutConfig(num_inference_steps=4, guidance_scale=5.0)  # final x0, K=1
    loss_x0, _, _ = draftplus_step(m, mean_red, PROMPTS, z, default, kl_coeff=1.0,
                                   generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss_x0, params))
    if scheduler_name in DETERMINISTIC:
        cond = m.family.encode_prompts(PROMPTS)
        with torch.no_grad():
            ours = rollout(m, cond, z, config, with_reference=False).images
        torch.testing.assert_close(ours, pipeline_images(pipe, z, 4, 5.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheduler_name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_samplers_ending_at_sigma_zero_decode_the_same_either_way(tiny_sd_path, scheduler_name):
    m, _, _, _ = make_models(tiny_sd_path, scheduler_name)
    cond = m.family.encode_prompts(PROMPTS)
    with torch.no_grad():
        x0, sample = (rollout(m, cond, noise(), RolloutConfig(
            num_inference_steps=4, guidance_scale=5.0, final_latent=f), with_reference=False).latents
            for f in ("x0", "sample"))
    torch.testing.assert_close(x0, sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_non_square_latents_roll_out_like_the_pipeline(tiny_sd_path, scheduler_name):
    m, params, _, pipe = make_models(tiny_sd_path, scheduler_name)
    z = noise(size=(16, 24))
    config = RolloutConfig(num_inference_steps=3, guidance_scale=5.0, final_latent="sample")
    out = rollout(m, m.family.encode_prompts(PROMPTS), z, config)
    assert out.images.shape == (2, 3, 32, 48)
    torch.testing.assert_close(out.images.detach(), pipeline_images(pipe, z, 3, 5.0), atol=1e-5, rtol=1e-5)
