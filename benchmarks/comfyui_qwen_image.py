"""How many modules of a draftplus Qwen-Image LoRA ComfyUI's own LoRA code applies, on Qwen-Image's real module names.

Not a test: it needs a ComfyUI checkout (not part of this repository; `--comfyui PATH`, run in an environment with
ComfyUI's requirements, e.g. einops and torchsde on top of this repository's). It writes a LoRA with the real
Qwen/Qwen-Image transformer's module names (the config in tests/test_family_qwen_image.py; random rank-4 weights,
alpha 8) as the trainer writes it, exports the ComfyUI file, builds ComfyUI's Qwen-Image model from its config on
the meta device (no weights), and loads both files with ComfyUI's key map (`model_lora_keys_unet`) and loader
(`load_lora`): the modules it patches, at which alpha, and the keys it leaves unused.

    python benchmarks/comfyui_qwen_image.py --comfyui /path/to/ComfyUI [--preset attention+ff]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen/Qwen-Image's transformer/config.json
QWEN_IMAGE = {"attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False, "in_channels": 64,
              "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60, "out_channels": 16,
              "patch_size": 2}


def write_lora(out_dir: Path, preset: str, rank: int = 4, alpha: float = 8.0) -> Path:
    """The trainer's LoRA file for the real transformer (random weights of the real shapes), and its ComfyUI file."""
    from diffusers import QwenImageTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    from utils.families.qwen_image import QwenImage
    from utils.lora import LORA_WEIGHTS_NAME, add_lora, inference_metadata

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(QWEN_IMAGE)
        add_lora(transformer, rank=rank, lora_alpha=alpha, target_modules=QwenImage.target_modules([preset], QWEN_IMAGE))
    generator = torch.Generator().manual_seed(0)
    layers = {k: torch.randn(v.shape, generator=generator) * 0.01
              for k, v in get_peft_model_state_dict(transformer).items()}
    QwenImage.save_lora_weights(out_dir, layers, **inference_metadata(transformer, QwenImage))
    QwenImage.export_ui_lora(out_dir / LORA_WEIGHTS_NAME)
    return out_dir


def comfy_load(comfyui: Path, files: list[Path]) -> dict[str, dict]:
    """ComfyUI's Qwen-Image model (meta device) and, per file, what its LoRA loader makes of it."""
    sys.path.insert(0, str(comfyui))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.supported_models
    import comfy.utils

    unet_config = {"image_model": "qwen_image", "in_channels": QWEN_IMAGE["in_channels"],
                   "num_layers": QWEN_IMAGE["num_layers"]}  # what comfy.model_detection reads off a checkpoint
    model_config = comfy.supported_models.QwenImage(unet_config)
    with torch.device("meta"):
        model = model_config.get_model({}, device=torch.device("meta"))
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    results = {}
    for file in files:
        unused: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record, unused=unused: unused.append(record.getMessage())
        logging.getLogger().addHandler(handler)
        try:
            patches = comfy.lora.load_lora(comfy.utils.load_torch_file(str(file)), key_map)
        finally:
            logging.getLogger().removeHandler(handler)
        alphas = sorted({float(p.weights[2]) if p.weights[2] is not None else None for p in patches.values()},
                        key=str)
        results[file.name] = {"patched": len(patches), "alphas": alphas,
                              "unused": [m for m in unused if "not loaded" in m]}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout")
    parser.add_argument("--preset", default="attention", help="--lora_target_modules preset")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    from utils.lora import COMFYUI_WEIGHTS_NAME, LORA_WEIGHTS_NAME

    with tempfile.TemporaryDirectory() as tmp:
        out = write_lora(Path(tmp), args.preset)
        modules = sum(k.endswith(".lora_A.weight") for k in load_file(out / LORA_WEIGHTS_NAME))
        results = comfy_load(args.comfyui, [out / LORA_WEIGHTS_NAME, out / COMFYUI_WEIGHTS_NAME])
    print(f"preset {args.preset}: {modules} LoRA modules in the file")
    for name, result in results.items():
        print(f"  {name}: ComfyUI patched {result['patched']} of {modules}, alpha {result['alphas']} (rank 4), "
              f"{len(result['unused'])} keys not loaded {result['unused'][:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
