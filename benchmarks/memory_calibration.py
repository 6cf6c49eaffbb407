"""The estimator against every committed GPU measurement of a training step's peak memory.

    python -m benchmarks.memory_calibration     # -> benchmarks/results/memory_calibration.{json,md}

Each measurement in benchmarks/results/*_cuda.json with a whole-step peak (`peak_batch1`: speed_memory.py's peak
section) is estimated with the command line of the same setting (`train_draftplus.py --estimate_memory`) on the
committed configs of the measured architecture. The measured models differ from the published ones in one way,
which is accounted for: their CLIP text towers (the SD text encoder, the PickScore reward's) have the generated
tokenizer's small vocabulary (`clip_text_config`) instead of CLIP's 49408 tokens, so their embedding tables are
smaller; that difference is computed from the configs and taken off the estimate ("like for like"). The benchmark's
step also has no optimiser state (its LoRA state is 0.01 GiB at rank 4, left in).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.memory_table import CONFIGS, estimate_row  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30
# speed_memory.py's models by label: configs, resolution, and the CLIP text towers whose vocabulary it shrinks
# (their widths: the SD1.5 text encoder's 768, the CLIP-H reward's 1024).
MEASURED = {"sd15": {"configs": "sd15", "resolution": 512, "clip_widths": (768, 1024)},
            "sdxl": {"configs": "sdxl", "resolution": 1024, "clip_widths": (768, 1280, 1024)}}
CLIP_VOCAB = 49408


def generated_vocab() -> int:
    from utils.toys.tiny_models import build_clip_tokenizer

    return len(build_clip_tokenizer())


def main() -> None:
    rows = []
    for path in sorted(RESULTS.glob("speed_memory_*_cuda.json")):
        measured = json.loads(path.read_text())
        model = MEASURED.get(measured["model"])
        if model is None or not measured.get("peak_batch1"):
            continue
        vocab_bytes = (CLIP_VOCAB - generated_vocab()) * sum(model["clip_widths"]) * 2  # bf16 embedding rows
        for row in measured["peak_batch1"]:
            argv = ["--pretrained_model_name_or_path", str(CONFIGS / model["configs"]), "--estimate_memory",
                    "--resolution", str(model["resolution"]), "--mixed_precision", "bf16", "--reward", "pickscore",
                    "--reward_dtype", "bf16", "--num_inference_steps", str(row["T"]), "--truncation_steps",
                    str(row["K"]), "--train_batch_size", str(row["batch_size"]), "--kl_coeff",
                    str(measured["kl_coeff"]), "--report_to", "none",
                    *(["--gradient_checkpointing"] if row["gradient_checkpointing"] else [])]
            estimate = estimate_row(argv)
            like_for_like = estimate["peak_bytes"] - vocab_bytes
            rows.append({"measurement": path.name, "machine": measured["machine"],
                         "gradient_checkpointing": row["gradient_checkpointing"],
                         "measured_allocated_bytes": row["peak_allocated_bytes"],
                         "estimated_bytes": estimate["peak_bytes"], "vocabulary_difference_bytes": vocab_bytes,
                         "like_for_like_bytes": like_for_like,
                         "error": like_for_like / row["peak_allocated_bytes"] - 1,
                         "command": "train_draftplus.py " + " ".join(argv), "estimate": estimate})
            print(f"{path.name} ckpt={row['gradient_checkpointing']}: measured "
                  f"{row['peak_allocated_bytes'] / GIB:.2f} GiB, estimated {like_for_like / GIB:.2f} GiB "
                  f"({rows[-1]['error']:+.1%})", flush=True)
    (RESULTS / "memory_calibration.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# The memory estimator against the GPU measurements", "",
             "From `python -m benchmarks.memory_calibration`: each whole-step peak measured on a GPU "
             "(torch.cuda.max_memory_allocated) beside `train_draftplus.py --estimate_memory` for the same setting. "
             "'like for like': the estimate less the embedding rows the measured models lack (their CLIP text towers "
             "have a generated 787-token vocabulary, not CLIP's 49408).", "",
             "| measurement | machine | gradient checkpointing | measured (GiB) | estimated (GiB) | like for like (GiB) "
             "| error |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['measurement']} | {r['machine'].split(';')[0].strip()} | {r['gradient_checkpointing']} | "
              f"{r['measured_allocated_bytes'] / GIB:.2f} | {r['estimated_bytes'] / GIB:.2f} | "
              f"{r['like_for_like_bytes'] / GIB:.2f} | {r['error']:+.1%} |" for r in rows]
    (RESULTS / "memory_calibration.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
