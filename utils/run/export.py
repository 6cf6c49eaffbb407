"""Write the file ComfyUI (and, for SD/SDXL, AUTOMATIC1111) loads next to a draftplus LoRA:

    python -m utils.run.export OUTPUT_DIR [OUTPUT_DIR/checkpoint-200 ...] [--model MODEL]

writes, next to each `pytorch_lora_weights.safetensors`, the file `train_draftplus.py` writes at the end of
training unless `--no_kohya_export`: for checkpoints, and for runs trained without it. The model's family
decides the format (`--model`; without it, the base model a checkpoint of the run recorded, else the LoRA's
keys, where they leave no doubt): a UNet LoRA becomes `pytorch_lora_weights_kohya.safetensors` (kohya's format, for AUTOMATIC1111, ComfyUI, SD.Next,
InvokeAI); a flow-transformer LoRA becomes `pytorch_lora_weights_comfyui.safetensors` (diffusers' keys with a
per-module alpha tensor, for ComfyUI).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def recorded_base_model(directory: Path) -> str | None:
    """The base model the run that wrote `directory` (an output directory or one of its checkpoints) trained on,
    as its checkpoints record it; None where none is recorded or the model's files are not where it was."""
    from utils.families import read_model_index
    from utils.run.checkpoints import read_run_config

    for checkpoint in [directory, *sorted(directory.glob("checkpoint-*"))]:
        model = (read_run_config(str(checkpoint)) or {}).get("base_model")
        if model and read_model_index(model, local_only=True) is not None:
            return model
    return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m utils.run.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lora", nargs="+", metavar="DIR",
                   help="Trainer output or checkpoint-N directories (or their .safetensors files).")
    p.add_argument("--output", default=None,
                   help="Where to write the file (one LoRA only; default: next to the LoRA).")
    p.add_argument("--model", default=None,
                   help="The base model the LoRA was trained on (hub id, directory or toy name): its family picks "
                        "the format. Default: read from the LoRA's keys.")
    args = p.parse_args(argv)
    if args.output is not None and len(args.lora) > 1:
        p.error("--output takes one LoRA")
    from safetensors import SafetensorError

    from utils.errors import UserError
    from utils.families import family_of
    from utils.families.model_files import family_of_lora_file
    from utils.lora.files import lora_file_of

    for lora in args.lora:
        try:
            lora_file = lora_file_of(lora)
            model = args.model or recorded_base_model(lora_file.parent)
            family = family_of(model) if model else family_of_lora_file(lora_file)
            print(family.export_ui_lora(lora_file, args.output))
        except (OSError, ValueError, SafetensorError, UserError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
