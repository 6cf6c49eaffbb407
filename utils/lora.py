"""PEFT LoRA on the UNet: add adapters, save them in diffusers' format, load them back.

The saved file carries the adapter's LoraConfig as safetensors metadata, so `lora_alpha != rank`
(and target modules) survive `pipe.load_lora_weights(...)`; without it diffusers assumes alpha = rank.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import _collate_lora_metadata
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# `--lora_target_modules` presets; anything else is a list of module names (PEFT's target_modules).
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_k", "to_q", "to_v", "to_out.0"),  # diffusers' LoRA training scripts
    "attention+ff": ("to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),  # as NeMo-Aligner
}
DEFAULT_TARGET_MODULES = TARGET_PRESETS["attention"]


def expand_target_modules(names: Sequence[str]) -> list[str]:
    """Presets (`attention`, `attention+ff`) expanded to module names; other names kept, in order."""
    out: list[str] = []
    for name in names:
        for module in TARGET_PRESETS.get(name, (name,)):
            if module not in out:
                out.append(module)
    return out


def add_lora(
    unet: torch.nn.Module,
    rank: int,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
) -> list[torch.nn.Parameter]:
    """Freeze the UNet, add a LoRA adapter named "default", and return its (fp32) parameters."""
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha if lora_alpha is not None else rank,
        lora_dropout=lora_dropout,
        init_lora_weights="gaussian",
        target_modules=expand_target_modules(target_modules),
    )
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    # LoRA weights are the only thing optimised: keep them in fp32 even when the UNet is bf16/fp16,
    # otherwise small updates round away.
    for p in params:
        p.data = p.data.float()
    return params


@contextmanager
def adapters_disabled(unet: torch.nn.Module):
    """Run the frozen base model: the same UNet with its LoRA switched off.

    PEFT's disable also sets requires_grad=False on the LoRA weights, so a backward() taken before
    re-enabling would silently give them no gradient; the `finally` always switches them back on.
    """
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers' key format (what `load_lora_weights` expects)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


class LoraWriteError(OSError):
    """The LoRA file could not be written (disk full, permissions); the one already there is intact."""


def save_lora(unet: torch.nn.Module, output_dir: str | os.PathLike, family, is_main_process: bool = True) -> Path:
    """Write `pytorch_lora_weights.safetensors` (+ LoRA metadata) atomically into `output_dir`, in the
    format of `family`'s pipeline (a `utils.family.ModelFamily` class or instance).

    The file is written next to its destination and then renamed over it, so an interrupted or
    failed save never leaves a truncated LoRA where a good one was; a failure raises LoraWriteError
    saying what failed.
    """
    output_dir = Path(output_dir)
    target = output_dir / LORA_WEIGHTS_NAME
    if not is_main_process:
        return target
    state_dict = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(unet).items()}
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-lora-") as tmp:
            family.save_lora_weights(tmp, unet_lora_layers=state_dict, **_collate_lora_metadata({"unet": unet}))
            written = os.path.join(tmp, LORA_WEIGHTS_NAME)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(written, 0o666 & ~umask)  # files in a private temp dir are created 0600
            os.replace(written, target)
    except Exception as e:  # OSError, or safetensors' own error type for a failed write
        kept = "the LoRA already there is intact" if target.exists() else "no LoRA was there before"
        raise LoraWriteError(f"could not write {target} ({type(e).__name__}: {e}); {kept}") from e
    return target


def load_lora_into_unet(unet: torch.nn.Module, lora_dir: str | os.PathLike, family) -> None:
    """Load a saved LoRA into the UNet's existing "default" adapter (used to resume training)."""
    state_dict = family.lora_state_dict(lora_dir)
    unet_state_dict = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    unet_state_dict = convert_unet_state_dict_to_peft(unet_state_dict)
    result = set_peft_model_state_dict(unet, unet_state_dict, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA in {lora_dir} does not match the UNet's adapter: unexpected keys {unexpected[:3]}")
