"""LoRA on the denoiser: `adapters` (add, target, switch off), `files` (names, save and load), `exports` (the
files ComfyUI and AUTOMATIC1111 load; `python -m utils.run.export` writes them for an existing LoRA)."""

from utils.lora.adapters import (
    DEFAULT_TARGET_MODULES,
    GradOnlyDropout,
    adapted_modules,
    adapters_disabled,
    add_lora,
    check_lora_targets,
    expand_target_modules,
    unmatched_targets,
)
from utils.lora.exports import comfyui_state_dict, export_comfyui, export_kohya, kohya_state_dict
from utils.lora.files import (
    COMFYUI_WEIGHTS_NAME,
    KOHYA_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    LoraWriteError,
    inference_metadata,
    load_lora_into_denoiser,
    lora_state_dict,
    save_lora,
)

__all__ = [
    "COMFYUI_WEIGHTS_NAME", "DEFAULT_TARGET_MODULES", "GradOnlyDropout", "KOHYA_WEIGHTS_NAME", "LORA_WEIGHTS_NAME",
    "LoraWriteError", "adapted_modules", "adapters_disabled", "add_lora", "check_lora_targets", "comfyui_state_dict",
    "expand_target_modules", "export_comfyui", "export_kohya", "inference_metadata", "kohya_state_dict",
    "load_lora_into_denoiser", "lora_state_dict", "save_lora", "unmatched_targets",
]
