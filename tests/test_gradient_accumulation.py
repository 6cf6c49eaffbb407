"""Gradient accumulation (`train_draftplus.accumulate_gradients`): the micro-steps of one optimiser step draw
their own prompts and noise, and together they give the gradient of one step on their combined batch."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

import train_draftplus
from utils.families import load_family
from utils.lora import add_lora
from utils.prompts import ANIMALS
from utils.rollout.loop import Models, RolloutConfig, draftplus_step
from utils.run.metrics import StepMetrics

CONFIG = RolloutConfig(num_inference_steps=3, guidance_scale=3.0, truncation_steps=2)


class OneProcess:
    """What `accumulate_gradients` uses of an Accelerator: one CPU process, rank `process_index`."""

    device = torch.device("cpu")

    def __init__(self, process_index: int = 0) -> None:
        self.process_index = process_index

    def no_sync(self, model):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


def mean_red(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


def training_args(accumulation: int, batch: int, kl_coeff: float = 0.1):
    return SimpleNamespace(gradient_accumulation_steps=accumulation, train_batch_size=batch, seed=0,
                           kl_coeff=kl_coeff, negative_prompt="")


def record_steps(monkeypatch, run_the_step: bool) -> list[tuple[list[str], torch.Tensor]]:
    """The prompts and noise of every DRaFT+ step the loop takes (each step also runs, if `run_the_step`)."""
    seen = []

    def recording_step(models, reward_fn, prompts, noise, *rest):
        seen.append((list(prompts), noise.clone()))
        if run_the_step:
            return draftplus_step(models, reward_fn, prompts, noise, *rest)
        loss = torch.zeros((), requires_grad=True)
        return loss, torch.zeros(len(prompts)), torch.zeros(())

    monkeypatch.setattr(train_draftplus, "draftplus_step", recording_step)
    return seen


def test_each_micro_step_and_each_process_draws_its_own_prompts_and_noise(monkeypatch):
    seen = record_steps(monkeypatch, run_the_step=False)
    args, models = training_args(accumulation=3, batch=2), SimpleNamespace(denoiser=None)
    for process in (0, 1):
        train_draftplus.accumulate_gradients(OneProcess(process), models, mean_red, ANIMALS, args, CONFIG,
                                             (2, 4, 8, 8), 5, StepMetrics(torch.device("cpu")))
    assert len(seen) == 6  # 3 micro-steps on each of 2 processes
    for i in range(6):
        for j in range(i):
            assert seen[i][0] != seen[j][0], (i, j)
            assert not torch.equal(seen[i][1], seen[j][1]), (i, j)
    # ... drawn from (step, micro-step, process) alone, so a resumed run sees the same samples
    train_draftplus.accumulate_gradients(OneProcess(1), models, mean_red, ANIMALS, args, CONFIG, (2, 4, 8, 8), 5,
                                         StepMetrics(torch.device("cpu")))
    for again, first in zip(seen[6:], seen[3:6], strict=True):
        assert again[0] == first[0] and torch.equal(again[1], first[1])


@pytest.fixture()
def lora_models(tiny_sd_path):
    family = load_family(str(tiny_sd_path))
    for module in (family.vae, *family.text_encoders):
        module.requires_grad_(False)
    params = add_lora(family.denoiser, rank=4, lora_alpha=8)
    torch.manual_seed(1)
    for name, p in family.denoiser.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, where A gets no gradient: make it a trained LoRA
            p.data.normal_(0, 0.05)
    scheduler = family.pipe.scheduler.__class__.from_config(family.pipe.scheduler.config)
    models = Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae, scheduler=scheduler)
    return models, params


def test_the_accumulated_gradient_is_the_gradient_of_one_step_on_the_combined_batch(lora_models, monkeypatch):
    models, params = lora_models
    seen = record_steps(monkeypatch, run_the_step=True)
    latent_shape = (1, models.raw_denoiser.config.in_channels, 32 // models.family.vae_scale_factor,
                    32 // models.family.vae_scale_factor)
    totals = train_draftplus.accumulate_gradients(OneProcess(), models, mean_red, ANIMALS,
                                                  training_args(accumulation=2, batch=1), CONFIG, latent_shape, 0,
                                                  StepMetrics(torch.device("cpu")))
    accumulated = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    # One step on both micro-steps' samples at once: the mean loss over the combined batch.
    prompts = seen[0][0] + seen[1][0]
    loss, rewards, penalty = draftplus_step(models, mean_red, prompts, torch.cat([seen[0][1], seen[1][1]]), CONFIG,
                                            kl_coeff=0.1)
    loss.backward()
    assert penalty > 0 and any(p.grad.abs().max() > 0 for p in params)
    for got, want in zip(accumulated, (p.grad for p in params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-8)
    # and the logged loss, reward and penalty are the step's means
    torch.testing.assert_close(totals, torch.stack([loss.detach(), rewards.mean(), penalty]), rtol=1e-4, atol=1e-8)
