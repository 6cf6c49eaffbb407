"""Random LoRAs for the tiny test pipelines, saved in diffusers' format (shared by several test files)."""

import json
from pathlib import Path

import torch


def save_random_lora(pipeline_dir, out_dir, *, rank: int = 4, alpha: float = 4, seed: int = 1,
                     strength: float = 20.0, zero: bool = False, targets=None) -> Path:
    """A LoRA on the denoiser's attention projections (the UNet's, or the transformer's of SD3/FLUX) of the
    pipeline in `pipeline_dir`, written as `out_dir/pytorch_lora_weights.safetensors` with LoRA metadata (so
    alpha != rank survives).

    Both A and B are random (init_lora_weights=False), and B is scaled by `strength` so the tiny
    model's images visibly change; `zero` gives B = 0, a LoRA that is exactly the base model. `targets`: PEFT
    target modules (default: the four attention projections of the image stream)."""
    import diffusers
    from peft import LoraConfig

    from utils.families import family_of
    from utils.lora import save_lora

    family = family_of(str(pipeline_dir))
    _, class_name = json.loads((Path(pipeline_dir) / "model_index.json").read_text())[family.denoiser_name]
    torch.manual_seed(seed)
    denoiser = getattr(diffusers, class_name).from_pretrained(pipeline_dir, subfolder=family.denoiser_name)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian" if zero else False,
                                    target_modules=list(targets or ["to_q", "to_k", "to_v", "to_out.0"])))
    if not zero:
        with torch.no_grad():
            for name, p in denoiser.named_parameters():
                if "lora_B" in name:
                    p.mul_(strength)
    save_lora(denoiser, out_dir, family)
    return Path(out_dir)


def randomise_lora_B(denoiser: torch.nn.Module, std: float = 0.05, seed: int | None = 1) -> None:
    """Draw every lora_B weight of the denoiser's adapter from N(0, std), after `torch.manual_seed(seed)` unless
    None. PEFT initialises lora_B to zero, which makes the adapter a no-op and lora_A's gradient zero: this makes
    it a "trained" adapter, one that changes the prediction."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
