"""`python -m utils.evaluation`: the evaluator's command line (see utils/evaluation/evaluate.py).

    python -m utils.evaluation --pretrained_model_name_or_path assets/toy --prompts assets/toy/prompts.txt \
        --lora outputs/quickstart/checkpoint-20 outputs/quickstart --reward redness --output_dir outputs/eval

Its options are `EvalSettings`' fields, plus every option a model family of the trainer takes
(`ModelFamily.options`, e.g. FLUX's --max_sequence_length and --true_cfg_scale): each registered family's, so a
new family's options appear here as they do in the trainer. A sampler setting left out is the one the LoRAs'
training run recorded (utils/evaluation/run_settings.py), else the family's default.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from utils.errors import one_line_errors
from utils.evaluation.diversity import DEFAULT_DINO_MODEL, DIVERSITY_METRICS
from utils.evaluation.evaluate import Evaluation, evaluate
from utils.evaluation.settings import EvalSettings, EvaluationError, cli_option
from utils.families.base import FAMILIES, family_option_names
from utils.rollout.schedulers import SCHEDULERS

PROG = "python -m utils.evaluation"
RUN_DEFAULT = "default: the LoRAs' training run's, else"


def add_family_options(p: argparse.ArgumentParser) -> None:
    """`--NAME` for every option only some families take, typed as the trainer's default for it is; a family
    that does not take one refuses it (`ModelFamily.option_problem`)."""
    for name in family_option_names():
        takers = [f for f in FAMILIES if name in f.options]
        default = takers[0].rollout_defaults(None).get(name)
        p.add_argument(f"--{name}", type=type(default) if default is not None else str, default=None,
                       help=f"{' and '.join(f.pipeline_class_name for f in takers)} models: as the trainer's "
                            f"--{name} ({RUN_DEFAULT} the trainer's default for the model).")


def read_prompts(source: str) -> list[str]:
    """Any prompt source the trainer accepts (`--prompts`): built-in sets, .txt files, datasets, tars."""
    from utils.prompts import PromptSourceError, check_prompt_source, load_prompts

    try:
        check_prompt_source(source)
        return load_prompts(source)
    except PromptSourceError as e:
        raise EvaluationError(str(e)) from e


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line. Names of settings are `EvalSettings` field names, so they pass straight through."""
    from utils.evaluation.aig import SCHEDULE_HELP

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].removeprefix(f"`{PROG}`: "),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True,
                   help="Base pipeline: hub id, local dir, or a built-in pretrained toy: 'toy' (UNet) or 'toy-flow' (SD3).")
    p.add_argument("--lora", nargs="*", default=[], metavar="DIR",
                   help="LoRA dirs holding pytorch_lora_weights.safetensors (trainer outputs or checkpoint-N "
                        "dirs); labelled by directory name.")
    p.add_argument("--lora_scale", nargs="+", type=float, default=[], metavar="S",
                   help="Also evaluate every --lora at these strengths (diffusers' adapter weights): rows "
                        "NAME@scale=S.")
    p.add_argument("--aig", nargs="+", default=[], metavar="SCHEDULE",
                   help=f"Also evaluate every --lora under annealed importance guidance with these schedules "
                        f"({SCHEDULE_HELP}): rows NAME@aig=SCHEDULE.")
    p.add_argument("--mix", nargs="+", action="append", default=[], metavar="NAME=W",
                   help="Evaluate a weighted combination of LoRAs (NAME: a --lora label or a LoRA dir), e.g. "
                        "--mix a=0.5 b=0.5: row mix(a=0.5,b=0.5). Repeat --mix for several mixes.")
    p.add_argument("--no_base", action="store_true", help="Skip the base model (it is evaluated by default).")
    p.add_argument("--prompts", required=True,
                   help="Prompt source: a .txt file (one prompt per line), or any source the trainer accepts.")
    p.add_argument("--max_prompts", type=int, default=None, help="Use only the first N prompts.")
    p.add_argument("--seeds_per_prompt", type=int, default=4, help="Images per prompt (>= 2, for diversity).")
    p.add_argument("--seed", type=int, default=0, help="Base seed; image (i, j) gets a seed derived from (seed, i, j).")
    p.add_argument("--num_inference_steps", type=int, default=None,
                   help=f"Sampler steps ({RUN_DEFAULT} 20 for SD/SDXL; 28 for SD3 and FLUX.1-dev, 4 for "
                        "FLUX.1-schnell).")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help=f"Classifier-free guidance scale ({RUN_DEFAULT} 7.5 for SD/SDXL, 7.0 for SD3); FLUX.1-dev: "
                        "its distilled guidance (default 3.5); FLUX.1-schnell takes none.")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"Image size ({RUN_DEFAULT} the model's native size). Any of --resolution, --height, "
                        "--width keeps the run's size out.")
    p.add_argument("--height", type=int, default=None, help="Image height (default: --resolution).")
    p.add_argument("--width", type=int, default=None, help="Image width (default: --resolution).")
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                   help=f"Sampler ('model' = the model's own; {RUN_DEFAULT} ddim for SD/SDXL; SD3 and FLUX "
                        "sample with their own flow-matching sampler, 'model').")
    p.add_argument("--eta", type=float, default=None, help=f"DDIM eta ({RUN_DEFAULT} 0).")
    p.add_argument("--negative_prompt", default=None, help=f"Negative prompt for every image ({RUN_DEFAULT} none).")
    add_family_options(p)
    p.add_argument("--reward", default="redness", help="Reward spec for rewards.build_reward (e.g. redness, pickscore).")
    p.add_argument("--reward_options", nargs="*", default=[], metavar="KEY=VALUE", help="Options for the reward.")
    p.add_argument("--diversity_metric", default="lpips", choices=DIVERSITY_METRICS,
                   help="lpips (AlexNet LPIPS; needs torchvision's AlexNet weights), lpips_random_backbone "
                        "(fixed-seed random AlexNet trunk: offline stand-in, not comparable to lpips), "
                        "pixel_l2 (RMS pixel distance), dino (1 - cosine of DINOv2 [CLS] embeddings).")
    p.add_argument("--diversity_model", default=None,
                   help=f"DINOv2 model for --diversity_metric dino: local dir or hub id (default {DEFAULT_DINO_MODEL}).")
    p.add_argument("--batch_size", type=int, default=16, help="Images per pipeline call.")
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="Pipeline weights dtype.")
    p.add_argument("--grid_prompts", type=int, default=8,
                   help="Save a labelled samples_<row>.png grid of the first N prompts per row, and all of them "
                        "in samples.png (0: none).")
    p.add_argument("--output_dir", default="outputs/eval", help="Where results.json/csv and the plot go.")
    p.add_argument("--overwrite", action="store_true",
                   help="Discard the rows already in --output_dir's results.json (default: keep and skip them).")
    args = p.parse_args(argv)
    if args.seeds_per_prompt < 2:
        p.error("--seeds_per_prompt must be >= 2 (diversity compares images of the same prompt)")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if args.diversity_model is not None and args.diversity_metric != "dino":
        p.error("--diversity_model is for --diversity_metric dino")
    return args


def _run(args: argparse.Namespace) -> Evaluation:
    from rewards import parse_reward_options

    passed = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalSettings)
              if f.name not in ("model", "prompts", "reward", "reward_options", "family_options")}
    passed.update({name: getattr(args, name) for name in family_option_names()})
    record = {k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite")}
    reward_options = parse_reward_options(args.reward_options)
    prompts = read_prompts(args.prompts)[: args.max_prompts]
    record["prompts_used"] = len(prompts)
    return evaluate(args.pretrained_model_name_or_path, prompts, reward=args.reward, reward_options=reward_options,
                    loras=args.lora, lora_scales=args.lora_scale, aig=args.aig, mixes=args.mix,
                    include_base=not args.no_base, output_dir=args.output_dir, overwrite=args.overwrite,
                    log=print, record=record, spell=cli_option, **passed)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a problem the user can fix ends it with one line on stderr and exit code 2."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # see train_draftplus.main
    args = parse_args(argv)
    with one_line_errors(PROG):
        result = _run(args)
    out = Path(args.output_dir)
    print(f"{len(result.rows)} rows in {out / 'results.json'}; plot: {out / 'reward_vs_diversity.png'}")
    return 0

