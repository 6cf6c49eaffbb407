"""One training step under a `MemoryTrace`, labelled by part: the trainer's own step, made of the same calls.

The weights are registered by component before the step (the LoRA and the optimiser state apart from the frozen
denoiser), then the step runs as `train_draftplus.py` runs it: `draftplus_step` under autocast (with CUDA's policy:
`utils.memory.autocast`), backward, gradient
clipping, the optimiser's update. Forward pre-hooks name the phase each new tensor belongs to: the prompt
encoding, the no-grad prefix, a graded step, the adapters-off reference, the VAE decode, the reward; then the
backward and the update. The same function traces a model built from configs (fake tensors: the estimate) and a
real one (the check that the estimate is what a run allocates).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from utils.memory.autocast import cuda_autocast_policy
from utils.memory.trace import MemoryTrace
from utils.rollout.loop import Models, RolloutConfig, draftplus_step

# The phases of a step, in the order they come; each labels the tensors it allocates.
PROMPTS, PREFIX, GRADED, REFERENCE, DECODE, REWARD, BACKWARD, UPDATE = (
    "prompt encoding", "no-grad prefix", "graded steps", "reference pass", "VAE decode", "reward", "backward",
    "optimiser update")
PHASES = (PROMPTS, PREFIX, GRADED, REFERENCE, DECODE, REWARD, BACKWARD, UPDATE)
LORA, GRADIENTS, OPTIMISER = "LoRA weights", "LoRA gradients", "optimiser state"
CACHED_PROMPTS = "prompt embeddings (cached)"  # --precompute_prompt_embeddings: the batch's, read from the cache


def weights_label(component: str) -> str:
    return f"weights: {component}"


@contextlib.contextmanager
def phase_hooks(trace: MemoryTrace, models: Models, reward_fn: torch.nn.Module,
                lora_params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Forward pre-hooks that set the trace's phase from the module being called (and, for the denoiser, from the
    grad mode and the adapters' state: `adapters_disabled` switches the LoRA's requires_grad off)."""
    def denoiser_phase() -> str:
        if torch.is_grad_enabled():
            return GRADED
        return REFERENCE if lora_params and not lora_params[0].requires_grad else PREFIX

    def hook(phase: Callable[[], str]):
        def set_phase(module, args) -> None:
            if trace.phase not in (BACKWARD, UPDATE):  # gradient checkpointing's recompute belongs to backward
                trace.phase = phase()
        return set_phase

    modules = [(m, lambda: PROMPTS) for m in models.family.text_encoders]
    modules += [(models.raw_denoiser, denoiser_phase), (reward_fn, lambda: REWARD)]
    # The rollout calls `vae.decode`, not the VAE's forward: its parts (post-quant conv, decoder) are called.
    modules += [(m, lambda: DECODE) for m in models.vae.children()]
    handles = [m.register_forward_pre_hook(hook(phase)) for m, phase in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def register_weights(trace: MemoryTrace, models: Models, reward_fn: torch.nn.Module,
                     lora_params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer | None) -> None:
    """Count what lives through the step: the LoRA and its optimiser state first (they sit inside the denoiser),
    then each component's frozen weights."""
    trace.register(lora_params, LORA)
    if optimizer is not None:
        trace.register([t for state in optimizer.state.values() for t in state.values()
                        if isinstance(t, torch.Tensor)], OPTIMISER)
    pipe = models.family.pipe
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            trace.register_module(component, weights_label(name))
    trace.register_module(reward_fn, weights_label("reward"))


def traced_step(trace: MemoryTrace, models: Models, reward_fn: torch.nn.Module, lora_params: Sequence[torch.Tensor],
                optimizer: torch.optim.Optimizer | None, prompts: list[str], noise: torch.Tensor,
                config: RolloutConfig, *, kl_coeff: float, negative_prompt: str = "",
                autocast_dtype: torch.dtype | None = None, max_grad_norm: float = 1.0) -> MemoryTrace:
    """Run one training step (one micro-step and the update) under `trace`; returns it."""
    register_weights(trace, models, reward_fn, lora_params, optimizer)
    device = noise.device.type
    tracing = contextlib.nullcontext() if trace.active else trace  # the estimate traces its setup too
    with tracing, phase_hooks(trace, models, reward_fn, lora_params), cuda_autocast_policy(device):
        with trace.in_phase(PROMPTS), torch.autocast(device, dtype=autocast_dtype or torch.float32,
                                                     enabled=autocast_dtype is not None):
            loss, _, _ = draftplus_step(models, reward_fn, prompts, noise, config, kl_coeff, negative_prompt)
        with trace.in_phase(BACKWARD):
            loss.backward()
            del loss
            trace.relabel([p.grad for p in lora_params if p.grad is not None], GRADIENTS)
        with trace.in_phase(UPDATE):
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(lora_params, max_grad_norm)
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return trace
