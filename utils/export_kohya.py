"""Write the file ComfyUI (and, for SD/SDXL, AUTOMATIC1111) loads next to a draftplus LoRA:

    python -m utils.export_kohya OUTPUT_DIR [OUTPUT_DIR/checkpoint-200 ...]

writes, next to each `pytorch_lora_weights.safetensors`, the file `train_draftplus.py` writes at the end of
training unless `--no_kohya_export`: for checkpoints, and for runs trained without it. The LoRA's keys decide
the format: an SD/SDXL (UNet) LoRA becomes `pytorch_lora_weights_kohya.safetensors` (kohya's format, for
AUTOMATIC1111, ComfyUI, SD.Next, InvokeAI); an SD3/FLUX (transformer) LoRA becomes
`pytorch_lora_weights_comfyui.safetensors` (diffusers' keys with a per-module alpha tensor, for ComfyUI).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m utils.export_kohya", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lora", nargs="+", metavar="DIR",
                   help="Trainer output or checkpoint-N directories (or their .safetensors files).")
    p.add_argument("--output", default=None,
                   help="Where to write the file (one LoRA only; default: next to the LoRA).")
    args = p.parse_args(argv)
    if args.output is not None and len(args.lora) > 1:
        p.error("--output takes one LoRA")
    from safetensors import SafetensorError

    from utils.lora import export_for_ui

    for lora in args.lora:
        try:
            print(export_for_ui(lora, args.output))
        except (OSError, ValueError, SafetensorError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
