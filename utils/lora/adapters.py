"""PEFT LoRA adapters on the denoiser (a UNet or a transformer): add them, name their targets, switch them off
for the reference pass, and the dropout that acts only where gradients flow."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
from peft import LoraConfig

from utils.errors import UserError

# The attention projections every family's denoiser has (the `attention` preset of the UNet families);
# `utils.families` holds each family's presets (`--lora_target_modules attention`, `attention+ff`).
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


def expand_target_modules(names: Sequence[str], presets: Mapping[str, Sequence[str]]) -> list[str]:
    """Presets (e.g. `attention`, `attention+ff`) expanded to module names; other names kept, in order."""
    out: list[str] = []
    for name in names:
        for module in presets.get(name, (name,)):
            if module not in out:
                out.append(module)
    return out


def add_lora(
    denoiser: torch.nn.Module,
    rank: int,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, add a LoRA adapter named "default" on the modules named `target_modules`
    (presets expanded: `ModelFamily.target_modules`), and return its (fp32) parameters."""
    check_lora_targets(denoiser, target_modules)
    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha if lora_alpha is not None else rank,
        lora_dropout=lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    denoiser.add_adapter(config)
    _grad_only_dropout(denoiser)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    # LoRA weights are the only thing optimised: keep them in fp32 even when the denoiser is bf16/fp16 (or
    # 4-bit, whose LoRA layers PEFT creates in the compute dtype), otherwise small updates round away.
    for p in params:
        p.data = p.data.float()
    return params


class GradOnlyDropout(torch.nn.Dropout):
    """LoRA dropout that acts in the calls autograd records, and in no other, whatever the train/eval mode.

    Dropout regularises the LoRA's gradient, so it belongs to the rollout's graded calls; every no-grad
    call (the step prefix, the adapters-off reference, validation and evaluation renders) must be the
    model itself. The trainer keeps the denoiser in eval mode throughout. Switching dropout modules on only
    around the graded call would not do: gradient checkpointing recomputes that call during backward,
    after the rollout has returned, and a recompute without the forward's dropout fails (or, were it
    allowed, differentiates another function). The recompute runs with grad enabled and the forward's
    RNG state, so here it draws the same masks.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, self.p, torch.is_grad_enabled(), self.inplace)


def _grad_only_dropout(denoiser: torch.nn.Module) -> None:
    """Replace PEFT's LoRA dropout (an nn.Dropout per adapter in each layer's `lora_dropout` ModuleDict,
    created in training mode) with GradOnlyDropout, in the denoiser's train/eval mode."""
    for layer in list(denoiser.modules()):
        dropouts = getattr(layer, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for adapter, module in list(dropouts.items()):
            if isinstance(module, torch.nn.Dropout) and not isinstance(module, GradOnlyDropout):
                dropouts[adapter] = GradOnlyDropout(module.p, module.inplace).train(denoiser.training)


def unmatched_targets(module_names: Iterable[str], targets: Iterable[str]) -> list[str]:
    """Targets that name no module, with PEFT's rule for a list of names (the name or its last parts)."""
    names = list(module_names)
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check_lora_targets(denoiser: torch.nn.Module, targets: Iterable[str]) -> None:
    """UserError naming the targets no module of the denoiser matches, with its commonest layer names as a
    hint (PEFT's own error lists every module)."""
    missing = unmatched_targets((n for n, _ in denoiser.named_modules()), targets)
    if not missing:
        return
    layers: dict[str, int] = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            short = ".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit() else name.split(".")[-1]
            layers[short] = layers.get(short, 0) + 1
    examples = ", ".join(sorted(layers, key=lambda k: -layers[k])[:10])
    raise UserError(f"--lora_target_modules: no {type(denoiser).__name__} module is named {' '.join(missing)} "
                    f"(or a preset, which --help lists per model family; layer names include {examples})")


def adapted_modules(denoiser: torch.nn.Module) -> list[str]:
    """The names of the denoiser's modules that carry a LoRA adapter (what `--lora_target_modules` matched)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in denoiser.named_modules() if isinstance(module, BaseTunerLayer)]


@contextmanager
def adapters_disabled(denoiser: torch.nn.Module):
    """Run the frozen base model: the same denoiser with its LoRA switched off (with `--quantize_base`, the
    quantized base weights).

    PEFT's disable also sets requires_grad=False on the LoRA weights, so a backward() taken before
    re-enabling would silently give them no gradient; the `finally` always switches them back on.
    """
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()

