"""Random LoRAs for the tiny test pipelines, saved in diffusers' format (shared by several test files)."""

from pathlib import Path

import torch


def save_random_lora(pipeline_dir, out_dir, *, rank: int = 4, alpha: float = 4, seed: int = 1,
                     strength: float = 20.0, zero: bool = False) -> Path:
    """A LoRA on the UNet's attention projections of the pipeline in `pipeline_dir`, written as
    `out_dir/pytorch_lora_weights.safetensors` with LoRA metadata (so alpha != rank survives).

    Both A and B are random (init_lora_weights=False), and B is scaled by `strength` so the tiny
    model's images visibly change; `zero` gives B = 0, a LoRA that is exactly the base model."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from utils.family import family_of
    from utils.lora import save_lora

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian" if zero else False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if not zero:
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.mul_(strength)
    save_lora(unet, out_dir, family_of(str(pipeline_dir)))
    return Path(out_dir)
