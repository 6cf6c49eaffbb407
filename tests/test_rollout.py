"""The DRaFT+ step on a tiny random SD model: values, gradients, reference pass, K>1 and DRaFT-LV."""

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline

from train_draftplus import Models, draftplus_step
from utils.lora import adapters_disabled, add_lora
from utils.rollout import RolloutConfig, encode_prompts, kl_penalty, rollout

PROMPTS = ["a red circle", "a blue square"]


def mean_red(images, prompts):
    """A tiny differentiable reward: mean of the red channel (enough to make gradients flow)."""
    return images[:, 0].mean(dim=(1, 2))


@pytest.fixture()
def models(tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    base_unet = copy.deepcopy(pipe.unet)  # pristine copy, only for comparisons
    params = add_lora(pipe.unet, rank=4, lora_alpha=8)
    # PEFT initialises lora_B to zero, which makes the adapter a no-op and lora_A's gradient zero;
    # give B small values so the tests exercise a "trained" adapter.
    torch.manual_seed(1)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    m = Models(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.unet, pipe.scheduler)
    return m, params, base_unet, pipe


def noise(batch=2, seed=0):
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_kl_penalty_matches_hand_computation():
    eps = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])]
    ref = [torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])]
    # step 1: (0 + 4 + 0 + 4) / 4 = 2; step 2: (1 + 1 + 1 + 0) / 4 = 0.75; mean over steps = 1.375
    assert kl_penalty(eps, ref).item() == pytest.approx(1.375)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_penalty_compares_noise_predictions_whatever_the_model_predicts(prediction_type):
    """DRaFT+ penalises eps_theta - eps_ref: v- and x0-predicting models are converted to eps first."""
    from diffusers import DDIMScheduler

    from utils.rollout import predict_epsilon

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor(301)
    a = scheduler.alphas_cumprod[t]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    output = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(predict_epsilon(scheduler, output, t, x_t), eps, atol=1e-5, rtol=1e-5)


def test_rollout_matches_diffusers_pipeline(models):
    """Forward values of the training rollout are exactly what the diffusers pipeline samples."""
    m, _, _, pipe = models
    z = noise()
    config = RolloutConfig(num_inference_steps=4, guidance_scale=5.0, truncation_steps=2)
    cond = encode_prompts(m.tokenizer, m.text_encoder, PROMPTS, guided=True)
    with torch.no_grad():
        ours = rollout(m.unet, m.scheduler, m.vae, cond, z, config, with_reference=False).images
        theirs = pipe(PROMPTS, latents=z.clone(), num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                      output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_adapters_disabled_equals_base_unet_exactly(models):
    m, _, base_unet, _ = models
    x, t = noise(), torch.tensor(500)
    cond = encode_prompts(m.tokenizer, m.text_encoder, PROMPTS, guided=False).encoder_hidden_states
    with torch.no_grad():
        with_lora = m.unet(x, t, encoder_hidden_states=cond).sample
        with adapters_disabled(m.unet):
            disabled = m.unet(x, t, encoder_hidden_states=cond).sample
        base = base_unet(x, t, encoder_hidden_states=cond).sample
    assert torch.equal(disabled, base)
    assert not torch.allclose(with_lora, base)  # the adapter is active again afterwards
    assert all(p.requires_grad for n, p in m.unet.named_parameters() if "lora" in n)


def test_one_step_gives_every_lora_param_a_gradient_and_leaves_base_frozen(models):
    m, params, _, _ = models
    base_before = {n: p.detach().clone() for n, p in m.unet.named_parameters() if "lora" not in n}
    lora_before = [p.detach().clone() for p in params]
    config = RolloutConfig(num_inference_steps=3, guidance_scale=3.0)
    loss, rewards, penalty = draftplus_step(m, mean_red, PROMPTS, noise(), config, kl_coeff=1.0)
    loss.backward()
    assert len(params) > 0 and penalty.item() > 0
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    torch.optim.SGD(params, lr=1.0).step()
    for n, p in m.unet.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base_before[n]), n
            assert p.grad is None
    assert all(not torch.equal(p, b) for p, b in zip(params, lora_before))
    for module in (m.vae, m.text_encoder):
        assert all(p.grad is None for p in module.parameters())


def test_loss_is_reward_plus_weighted_penalty_and_kl0_is_plain_draft(models):
    m, params, _, _ = models
    config = RolloutConfig(num_inference_steps=3, guidance_scale=3.0)
    loss, rewards, penalty = draftplus_step(m, mean_red, PROMPTS, noise(), config, kl_coeff=0.5)
    assert loss.item() == pytest.approx(-rewards.mean().item() + 0.5 * penalty.item(), rel=1e-6)

    # kl_coeff = 0: no reference pass at all, loss is exactly -mean reward, same images and gradients
    # as the reward term alone of a DRaFT+ step.
    calls = []
    m.unet.disable_adapters = lambda: calls.append(1)
    loss0, rewards0, penalty0 = draftplus_step(m, mean_red, PROMPTS, noise(), config, kl_coeff=0.0)
    del m.unet.disable_adapters
    assert calls == [] and penalty0.item() == 0.0
    assert loss0.item() == pytest.approx(-rewards0.mean().item())
    torch.testing.assert_close(rewards0, rewards)
    grads0 = torch.autograd.grad(loss0, params)
    reward_only = -mean_red(rollout(m.unet, m.scheduler, m.vae,
                                    encode_prompts(m.tokenizer, m.text_encoder, PROMPTS), noise(), config,
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


def test_truncation_k2_grades_two_steps_and_backprops_through_both(models):
    m, params, _, _ = models
    cond = encode_prompts(m.tokenizer, m.text_encoder, PROMPTS)
    out1 = rollout(m.unet, m.scheduler, m.vae, cond, noise(), RolloutConfig(4, 3.0, truncation_steps=1))
    out2 = rollout(m.unet, m.scheduler, m.vae, cond, noise(), RolloutConfig(4, 3.0, truncation_steps=2))
    assert len(out1.eps) == len(out1.eps_ref) == 1
    assert len(out2.eps) == len(out2.eps_ref) == 2
    assert all(e.requires_grad and not r.requires_grad for e, r in zip(out2.eps, out2.eps_ref))
    torch.testing.assert_close(out1.images, out2.images)  # same sample, only the graph differs
    g1 = torch.autograd.grad(mean_red(out1.images, PROMPTS).mean(), params)
    g2 = torch.autograd.grad(mean_red(out2.images, PROMPTS).mean(), params)
    # K=2 adds the earlier step's contribution: gradients differ but are all finite
    assert all(torch.isfinite(g).all() for g in g2)
    assert any(not torch.allclose(a, b) for a, b in zip(g1, g2))


def test_draft_lv_grades_n_renoised_copies(models):
    m, params, _, _ = models
    n = 3
    config = RolloutConfig(num_inference_steps=4, guidance_scale=3.0, lv_samples=n)
    cond = encode_prompts(m.tokenizer, m.text_encoder, PROMPTS)
    out = rollout(m.unet, m.scheduler, m.vae, cond, noise(), config, generator=torch.Generator().manual_seed(0))
    assert out.repeats == n and out.images.shape == (2 * n, 3, 32, 32)
    assert len(out.eps) == len(out.eps_ref) == 1 and out.eps[0].shape == (2 * n, 4, 16, 16)
    # copies of one prompt differ (independent re-noising) but stay close to the same x0
    assert not torch.allclose(out.images[0], out.images[1])
    loss, _, penalty = draftplus_step(m, mean_red, PROMPTS, noise(), config, kl_coeff=1.0,
                                      generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert penalty.item() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


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
    m.unet.enable_gradient_checkpointing()
    m.vae.enable_gradient_checkpointing()
    assert not m.unet.training and not m.vae.training
    ckpt_bytes, (loss_ckpt, _, _) = saved_bytes(step)
    assert ckpt_bytes < 0.5 * plain_bytes
    for a, b in zip(plain, torch.autograd.grad(loss_ckpt, params)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("scheduler_name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_other_schedulers_roll_out_like_the_pipeline(models, scheduler_name):
    import diffusers

    m, _, _, pipe = models
    m.scheduler = getattr(diffusers, scheduler_name).from_config(pipe.scheduler.config)
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(pipe.scheduler.config)
    config = RolloutConfig(num_inference_steps=4, guidance_scale=5.0)
    cond = encode_prompts(m.tokenizer, m.text_encoder, PROMPTS)
    ours = rollout(m.unet, m.scheduler, m.vae, cond, noise(), config, with_reference=True)
    ours.images.mean().backward()
    with torch.no_grad():
        theirs = pipe(PROMPTS, latents=noise(), num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                      output_type="pt").images
    torch.testing.assert_close(ours.images.detach(), theirs, atol=1e-5, rtol=1e-5)
