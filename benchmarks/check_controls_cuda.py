"""CUDA checks of the trade-off controls (no timing claims): run on a GPU machine from the repository root.

    python -m benchmarks.check_controls_cuda [--output_dir outputs/controls-cuda]

1. AIG `base` / `lora` reproduce the base and LoRA pipelines exactly in fp16 on CUDA (tiny SD and SDXL),
   and `linear` lies between them;
2. a short bf16 training run with live validation logs `peak_memory_gib`, writes the grids at the
   requested steps and the validation diversity, exports the kohya file, and the kohya file gives the
   diffusers file's images on CUDA.
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def check_aig(work: Path, sdxl: bool) -> bool:
    from lora_fixtures import save_random_lora

    from utils.evaluation.aig import aig_pipeline
    from utils.families import load_family
    from utils.toys.tiny_models import build_random_pipeline, build_random_sdxl_pipeline

    path = work / ("sdxl" if sdxl else "sd")
    (build_random_sdxl_pipeline if sdxl else build_random_pipeline)(path, seed=0)
    lora = save_random_lora(path, work / f"lora-{path.name}")
    pipe = load_family(str(path), dtype=torch.float16).pipe.to("cuda")
    kwargs = {"num_inference_steps": 4, "guidance_scale": 3.0, "output_type": "pt"}

    def render(call):
        return call(["a red circle", "a blue square"], generator=[torch.Generator("cuda").manual_seed(k)
                                                                   for k in range(2)], **kwargs).images

    base = render(pipe)
    pipe.load_lora_weights(str(lora))
    lora_images = render(pipe)
    ok = torch.equal(render(aig_pipeline(pipe, "base")), base) and torch.equal(render(aig_pipeline(pipe, "lora")),
                                                                               lora_images)
    middle = render(aig_pipeline(pipe, "linear"))
    gap = (lora_images - base).abs().mean()
    ok = ok and 0 < (middle - base).abs().mean() < gap and 0 < (middle - lora_images).abs().mean() < gap
    print(f"AIG {'SDXL' if sdxl else 'SD'} fp16 cuda: {'ok' if ok else 'FAILED'} (LoRA - base: {float(gap):.4f})")
    return bool(ok)


def check_training(work: Path) -> bool:
    out = work / "train"
    cmd = [sys.executable, str(ROOT / "train_draftplus.py"), "--pretrained_model_name_or_path", "toy", "--reward",
           "redness=1,brightness=0.2", "--prompts", str(ROOT / "assets/toy/prompts.txt"), "--resolution", "32",
           "--num_inference_steps", "10", "--guidance_scale", "5", "--kl_coeff", "0.01", "--learning_rate", "2e-2",
           "--train_batch_size", "4", "--max_train_steps", "6", "--checkpointing_steps", "6", "--mixed_precision",
           "bf16", "--validation_prompts", "a blue circle", "a green square", "--validation_steps", "3",
           "--validation_diversity", "--output_dir", str(out), "--report_to", "none"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    if result.returncode != 0:
        print("training bf16 cuda: FAILED\n" + result.stderr[-2000:])
        return False
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    grids = sorted(p.name for p in (out / "validation").glob("step-*.png"))
    ok = all(m.get("peak_memory_gib", 0) > 0 and "reward/brightness" in m for m in metrics) and grids == [
        "step-3.png", "step-6.png"]
    validation = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    ok = ok and all("diversity" in e for e in validation)
    print(f"training bf16 cuda: {'ok' if ok else 'FAILED'} (peak {metrics[-1].get('peak_memory_gib', 0):.3f} GiB, "
          f"grids {grids}, diversity {validation[-1].get('diversity_metric')})")

    from utils.families import load_family

    pipe = load_family("toy").pipe.to("cuda")
    kwargs = {"num_inference_steps": 10, "guidance_scale": 5.0, "output_type": "pt"}
    pipe.load_lora_weights(str(out))
    a = pipe("a blue circle", generator=torch.Generator("cuda").manual_seed(0), **kwargs).images
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights_kohya.safetensors")
    b = pipe("a blue circle", generator=torch.Generator("cuda").manual_seed(0), **kwargs).images
    same = float((a - b).abs().max())
    print(f"kohya round trip cuda: {'ok' if same < 1e-3 else 'FAILED'} (max difference {same:.2e})")
    return ok and same < 1e-3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default=str(ROOT / "outputs" / "controls-cuda"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    work = Path(args.output_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = [check_aig(work, sdxl=False), check_aig(work, sdxl=True), check_training(work)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
