"""The LoRA files other tools load: kohya's format for the UNet families (AUTOMATIC1111, ComfyUI) and diffusers'
transformer keys with per-module alpha tensors for ComfyUI's transformer loaders. Both tools ignore the
safetensors metadata, so each module's alpha travels as a tensor; which format a family writes is the family's
choice (`ModelFamily.export_ui_lora`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft

from utils.lora.files import (
    COMFYUI_WEIGHTS_NAME,
    KOHYA_WEIGHTS_NAME,
    lora_file_of,
    read_lora_file,
    save_atomically,
)


def _lora_alpha_for(module: str, metadata: dict, rank: int, component: str = "unet") -> float:
    """The module's lora_alpha from diffusers' LoRA metadata (alpha_pattern first, as PEFT resolves it);
    without metadata, diffusers loads alpha = rank, and so must the export."""

    alpha_pattern = metadata.get(f"{component}.alpha_pattern") or {}
    for pattern, alpha in alpha_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    alpha = metadata.get(f"{component}.lora_alpha")
    return float(alpha) if alpha is not None else float(rank)



def kohya_state_dict(lora_file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A diffusers LoRA file (as `save_lora` writes) in kohya's format, the one AUTOMATIC1111 and
    ComfyUI load: `lora_unet_<module>.lora_down/lora_up.weight` plus a `.alpha` per module.

    The keys come from diffusers' `convert_state_dict_to_kohya`; that function writes alpha = rank, so
    each `.alpha` is then set to the adapter's real lora_alpha (read from the file's LoRA metadata),
    or the LoRA would act at rank/alpha times its trained strength."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    state_dict, metadata = read_lora_file(lora_file)
    if not state_dict or not all(k.startswith("unet.") for k in state_dict):
        raise ValueError(f"{lora_file} is not a draftplus UNet LoRA (expected only 'unet.' keys)")
    peft_state_dict = convert_unet_state_dict_to_peft(state_dict)
    kohya = convert_state_dict_to_kohya(peft_state_dict)
    for key in [k for k in kohya if k.endswith(".alpha")]:
        module = key.removesuffix(".alpha")
        peft_module = next(k for k in peft_state_dict
                           if k.endswith(".lora_A.weight") and k.removesuffix(".lora_A.weight").replace(".", "_")
                           == module.replace("lora_unet", "unet", 1))
        rank = peft_state_dict[peft_module].shape[0]
        alpha = _lora_alpha_for(peft_module.removeprefix("unet.").removesuffix(".lora_A.weight"), metadata, rank)
        kohya[key] = torch.tensor(alpha, dtype=torch.float32)
    return {k: v.contiguous() for k, v in kohya.items()}



def export_kohya(lora: str | os.PathLike, output_file: str | os.PathLike | None = None) -> Path:
    """Write the kohya/webui version of a draftplus UNet LoRA (an output dir or its .safetensors file) as
    `pytorch_lora_weights_kohya.safetensors` next to it (or to `output_file`), atomically."""
    lora_file = lora_file_of(lora)
    target = Path(output_file) if output_file is not None else lora_file.with_name(KOHYA_WEIGHTS_NAME)
    return save_atomically(kohya_state_dict(lora_file), target,
                            {"format": "pt", "ss_network_module": "networks.lora", "ss_source": "draftplus"})



def comfyui_state_dict(lora_file: str | os.PathLike, component: str = "transformer") -> dict[str, torch.Tensor]:
    """A diffusers transformer LoRA file with one `<component>.<module>.alpha` tensor per module added: what
    ComfyUI's FLUX and SD3 loaders map completely at the exact alpha/rank scale (they read no safetensors
    metadata, and without the tensor take alpha = rank)."""
    state_dict, metadata = read_lora_file(lora_file)
    downs = [k for k in state_dict if k.endswith(".lora_A.weight")]
    if not downs or not all(k.startswith(component + ".") for k in state_dict):
        raise ValueError(f"{lora_file} is not a draftplus {component} LoRA (expected only '{component}.' keys)")
    out = dict(state_dict)
    for key in downs:
        module = key.removesuffix(".lora_A.weight")
        alpha = _lora_alpha_for(module.removeprefix(component + "."), metadata, state_dict[key].shape[0], component)
        out[module + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return {k: v.contiguous() for k, v in out.items()}


def export_comfyui(lora: str | os.PathLike, output_file: str | os.PathLike | None = None,
                   component: str = "transformer") -> Path:
    """Write the ComfyUI version of a draftplus transformer LoRA (an output dir or its .safetensors file) as
    `pytorch_lora_weights_comfyui.safetensors` next to it (or to `output_file`), atomically."""
    lora_file = lora_file_of(lora)
    target = Path(output_file) if output_file is not None else lora_file.with_name(COMFYUI_WEIGHTS_NAME)
    return save_atomically(comfyui_state_dict(lora_file, component), target, {"format": "pt"})


