"""utils/evaluation/aig.py: annealed importance guidance on ordinary diffusers SD and SDXL pipelines."""

import pytest
import torch
from lora_fixtures import save_random_lora

from utils.evaluation.aig import (
    AIGError,
    aig_pipeline,
    annealed_guidance,
    schedule_weights,
    step_position,
    weight_schedule,
)

STEPS = 4
KWARGS = {"num_inference_steps": STEPS, "guidance_scale": 3.0, "output_type": "pt"}


def test_schedules_give_the_documented_weights():
    assert schedule_weights("base", 4) == [0, 0, 0, 0]
    assert schedule_weights("lora", 4) == [1, 1, 1, 1]
    assert schedule_weights("linear", 4) == [0, 0.25, 0.5, 0.75]
    assert schedule_weights("power_2", 4) == [0, 0.0625, 0.25, 0.5625]
    assert schedule_weights("power_0.5", 4) == pytest.approx([0, 0.5, 0.5 ** 0.5, 0.75 ** 0.5])
    assert schedule_weights("step_0.6", 5) == [0, 0, 0, 1, 1]  # i/T = 0.6 counts as reached
    assert schedule_weights("step_0", 3) == [1, 1, 1] and schedule_weights("step_1", 3) == [0, 0, 0]
    for bad in ("cosine", "power_0", "power_", "step_1.5", "step_-0.1", "linear_2", ""):
        with pytest.raises(AIGError):
            weight_schedule(bad)


@pytest.mark.parametrize("name, kwargs, expected", [
    ("DDIMScheduler", {}, [0, 1, 2, 3]),
    ("EulerDiscreteScheduler", {}, [0, 1, 2, 3]),  # float timesteps
    ("PNDMScheduler", {"skip_prk_steps": True}, [0, 1, 1, 2, 3]),  # PLMS repeats its second timestep
    ("HeunDiscreteScheduler", {}, [0, 1, 1, 2, 2, 3, 3]),  # two evaluations per step after the first
])
def test_step_position_counts_distinct_timesteps(name, kwargs, expected):
    import diffusers

    scheduler = getattr(diffusers, name)(num_train_timesteps=1000, **kwargs)
    scheduler.set_timesteps(4)
    positions = [step_position(scheduler.timesteps, t) for t in scheduler.timesteps]
    assert [i for i, _ in positions] == expected and {n for _, n in positions} == {4}


@pytest.fixture(scope="module")
def sd_lora(tiny_sd_path, tmp_path_factory):
    return save_random_lora(tiny_sd_path, tmp_path_factory.mktemp("aig-sd-lora"))


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl_path, tmp_path_factory):
    return save_random_lora(tiny_sdxl_path, tmp_path_factory.mktemp("aig-sdxl-lora"))


def images(pipe, prompt="a red circle", seed=0):
    return pipe([prompt, "a blue square"], generator=[torch.Generator().manual_seed(seed + k) for k in range(2)],
                **KWARGS).images


def base_and_lora_pipes(path, lora, scheduler=None):
    from utils.families import load_family

    pipe = load_family(str(path)).pipe
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    base = images(pipe)
    pipe.load_lora_weights(str(lora))
    return pipe, base, images(pipe)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd", "sd-euler", "sdxl"])
def test_base_and_lora_schedules_reproduce_the_pipelines_exactly(family, tiny_sd_path, tiny_sdxl_path, sd_lora,
                                                                 sdxl_lora):
    import diffusers

    path, lora = (tiny_sdxl_path, sdxl_lora) if family == "sdxl" else (tiny_sd_path, sd_lora)
    pipe, base, lora_images = base_and_lora_pipes(
        path, lora, diffusers.EulerDiscreteScheduler if family == "sd-euler" else None)
    assert (lora_images - base).abs().max() > 0.05  # the LoRA matters, so the checks below can fail

    assert torch.equal(aig_pipeline(pipe, "base")(["a red circle", "a blue square"], generator=[
        torch.Generator().manual_seed(k) for k in range(2)], **KWARGS).images, base)
    with annealed_guidance(pipe, "lora") as aig:
        assert torch.equal(images(pipe), lora_images)
    # one UNet call per step (CFG batched), each at its own step with the weight of its schedule
    assert aig.weights_used == [(i, STEPS, 1.0) for i in range(STEPS)]

    with annealed_guidance(pipe, "linear") as aig:
        middle = images(pipe)
    assert [w for _, _, w in aig.weights_used] == schedule_weights("linear", STEPS)
    gap = (lora_images - base).abs().mean()
    to_base, to_lora = (middle - base).abs().mean(), (middle - lora_images).abs().mean()
    assert 0.01 * gap < to_base < gap and 0.01 * gap < to_lora < gap, (float(to_base), float(to_lora), float(gap))

    # leaving the context restores the plain LoRA pipeline
    assert torch.equal(images(pipe), lora_images)
    assert "forward" not in pipe.unet.__dict__


def test_unet_output_is_the_weighted_mix_of_both_predictions(tiny_sd_v_path, tmp_path):
    """On a v-prediction model: the raw outputs are mixed, (1 - w) base + w lora, at the call's step."""
    from utils.families import load_family

    pipe = load_family(str(tiny_sd_v_path)).pipe
    pipe.load_lora_weights(str(save_random_lora(tiny_sd_v_path, tmp_path / "lora")))
    pipe.scheduler.set_timesteps(5)
    t = pipe.scheduler.timesteps[2]  # step 2 of 5
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        lora = pipe.unet(x, t, encoder_hidden_states=text).sample
        pipe.disable_lora()
        base = pipe.unet(x, t, encoder_hidden_states=text).sample
        pipe.enable_lora()
    with annealed_guidance(pipe, lambda i, n: 0.3 + 0.1 * i / n) as aig:
        mixed = pipe.unet(x, t, encoder_hidden_states=text).sample
        mixed_tuple = pipe.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
    w = 0.3 + 0.1 * 2 / 5
    assert aig.weights_used[0] == (2, 5, pytest.approx(w))
    torch.testing.assert_close(mixed, (1 - w) * base + w * lora, rtol=0, atol=1e-6)
    assert torch.equal(mixed, mixed_tuple)
    assert (lora - base).abs().max() > 1e-2


@pytest.mark.slow
def test_requires_grad_flags_are_restored_and_misuse_is_a_clear_error(tiny_sd_path, sd_lora):
    from utils.families import load_family

    pipe = load_family(str(tiny_sd_path)).pipe
    with pytest.raises(AIGError, match="load_lora_weights"):
        with annealed_guidance(pipe, "linear"):
            pass
    pipe.load_lora_weights(str(sd_lora))
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    with annealed_guidance(pipe, "linear"):
        images(pipe)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags
    pipe.disable_lora()
    with pytest.raises(AIGError, match="disabled"):
        with annealed_guidance(pipe, "linear"):
            pass
    with pytest.raises(AIGError, match="unknown AIG schedule"):
        aig_pipeline(pipe, "cosine")
