"""--offload_text_encoders: the same images and LoRA gradient as without it, and the estimator shows its effect."""

import pytest
import torch

from rewards import build_reward
from utils.families import load_family
from utils.lora import add_lora
from utils.rollout.loop import Models, RolloutConfig, draftplus_step
from utils.run.offload import offload_between_calls


def one_step(family, lora_params):
    torch.manual_seed(0)
    models = Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                    scheduler=family.pipe.scheduler)
    noise = torch.randn(family.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(0))
    images = []

    def reward(x, prompts):
        images.append(x.detach().clone())
        return build_reward("redness")(x, prompts)

    loss, _, _ = draftplus_step(models, reward, ["a red square"], noise, RolloutConfig(num_inference_steps=3), 0.1)
    loss.backward()
    grads = [p.grad.clone() for p in lora_params]
    for p in lora_params:
        p.grad = None
    return images[0], grads


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_flux_dev_path"])
def test_offloaded_text_encoders_give_the_same_images_and_gradient(fixture, request):
    family = load_family(str(request.getfixturevalue(fixture)))
    family.pipe.set_progress_bar_config(disable=True)
    for module in (*family.text_encoders, family.denoiser, family.vae):
        module.requires_grad_(False).eval()
    lora_params = add_lora(family.denoiser, rank=4)
    for p in lora_params:  # lora_B away from its zero init, so the LoRA changes the images
        torch.nn.init.normal_(p, std=0.05)
    images, grads = one_step(family, lora_params)

    calls = []
    for encoder in family.text_encoders:
        offload_between_calls(encoder, torch.device("cpu"))
        encoder.register_forward_pre_hook(lambda module, args: calls.append(module))
    family.execution_device = torch.device("cpu")
    offloaded_images, offloaded_grads = one_step(family, lora_params)

    assert len(calls) >= len(family.text_encoders)  # the encoders ran through the hooks
    assert all(p.device.type == "cpu" for m in family.text_encoders for p in m.parameters())
    torch.testing.assert_close(offloaded_images, images, rtol=0, atol=0)
    for g, h in zip(offloaded_grads, grads, strict=True):
        torch.testing.assert_close(g, h, rtol=0, atol=0)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.slow  # traces the model twice: tens of seconds
def test_the_estimate_drops_the_text_encoders_weights(tiny_flux_dev_path):
    import train_draftplus
    from utils.memory import estimate_memory

    def estimate(*extra):
        args = train_draftplus.parse_args(["--pretrained_model_name_or_path", str(tiny_flux_dev_path), "--reward",
                                           "redness", "--resolution", "32", "--num_inference_steps", "3",
                                           "--estimate_memory", "--report_to", "none", *extra])
        return estimate_memory(args, args.checked)

    plain, offloaded = estimate(), estimate("--offload_text_encoders")
    encoders = sum(v for k, v in plain.held().items() if k.startswith("weights: text_encoder"))
    assert encoders > 0
    assert offloaded.total == max(plain.total - encoders, offloaded.floor)
    assert offloaded.floor == plain.phase_peaks["prompt encoding"]
