"""Evaluate a base model and LoRAs on reward and diversity: the two axes DRaFT+ trades off.

    python -m utils.evaluation --pretrained_model_name_or_path assets/toy --prompts assets/toy/prompts.txt \
        --lora outputs/quickstart/checkpoint-20 outputs/quickstart --reward redness --output_dir outputs/eval

Every row is one way of sampling, on the same prompts and per-image seeds (see utils/evaluation/plan.py):

    base                    the base model
    NAME                    a LoRA (NAME: its directory's name), at full strength
    NAME@scale=S            the LoRA at strength S (diffusers' adapter weights, `--lora_scale`)
    NAME@aig=SCHEDULE       the LoRA under annealed importance guidance (`--aig`, see utils/evaluation/aig.py)
    mix(a=0.5,b=0.5)        a weighted combination of LoRAs (`--mix a=0.5 b=0.5`)

Each row gets the mean reward and the diversity: the mean pairwise distance between the images of a
prompt (LPIPS by default, or DINOv2 cosine distance; utils/evaluation/diversity.py), averaged over prompts. The
files written are listed in utils/evaluation/outputs.py. Resumable: rows already in `results.json` are
skipped when the settings (utils/evaluation/settings.py) and the bytes of their LoRA files are the same, so an
interrupted or extended evaluation only computes what is missing, and a LoRA retrained in place is
evaluated again; `--overwrite` starts afresh. Every family the trainer serves (SD 1.x/2.x, SDXL, SD3/SD3.5,
FLUX.1) is evaluated with its own pipeline and the family's own options (`ModelFamily.options`). A sampler
setting left out is the one the LoRAs' training run recorded beside them (utils/evaluation/run_settings.py: a
LoRA is evaluated as it was trained, and the log says so), else the family's (`evaluation_defaults`). The
command line is utils/evaluation/cli.py.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from utils.evaluation.diversity import Diversity
from utils.evaluation.outputs import (
    ROW_FIELDS,
    Evaluation,
    check_output_dir,
    read_previous,
    write_outputs,
)
from utils.evaluation.plan import Adapter, Variant, plan_variants
from utils.evaluation.sampling import check_sampler, family_of_model, resolve_settings, with_family_defaults
from utils.evaluation.settings import EvalSettings, EvaluationError, python_option
from utils.rollout.schedulers import SCHEDULERS

__all__ = ["EvalSettings", "Evaluation", "EvaluationError", "evaluate", "family_of_model", "generate", "image_seed",
           "load_pipeline", "with_family_defaults"]


def load_pipeline(model: str, scheduler: str | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, options: Mapping[str, Any] | None = None):
    """The model family's diffusers pipeline (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1) with the trainer's sampler
    choice (None: the family's evaluation default); `toy` is the built-in toy model. `options`: the family's
    own (`ModelFamily.options`, e.g. FLUX's max_sequence_length; the trainer's defaults for those left out)."""
    return load_model_family(model, scheduler, device, dtype, options).pipe


def load_model_family(model: str, scheduler: str | None = None, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, options: Mapping[str, Any] | None = None):
    """`load_pipeline`'s pipeline, behind its `utils.families.ModelFamily` (the family's defaults and call
    arguments: `pipeline_kwargs` passes its options to the pipeline)."""
    import diffusers

    from utils.families import UnsupportedModelError, family_of

    try:
        family_class = family_of(model)
        scheduler = scheduler or family_class.evaluation_defaults(None)["scheduler"]
        check_sampler(family_class, scheduler, 0.0)
        family = family_class.load(model, dtype=dtype, **(options or {}))
    except UnsupportedModelError as e:
        raise EvaluationError(str(e)) from e
    except (OSError, ValueError) as e:
        raise EvaluationError(f"cannot load the base model {model!r}: {str(e).splitlines()[0]}") from e
    pipe = family.pipe
    if SCHEDULERS[scheduler] is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.to(device)
    return family


def image_seed(seed: int, prompt_index: int, seed_index: int) -> int:
    """The seed of image (prompt i, seed j): the same for every model, whatever the batching."""
    return (seed * 1_000_003 + prompt_index) * 10_007 + seed_index


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    pairs: Sequence[tuple[int, int]],
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    negative_kwargs: Mapping[str, Any] | None = None,
    eta: float = 0.0,
    pipeline_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Images `[len(pairs), 3, H, W]` in [0, 1] (fp32, CPU) for (prompt index, seed index) pairs, one batch.
    `pipeline_kwargs`: the family's own `__call__` arguments (`ModelFamily.pipeline_kwargs`: SD3/FLUX's T5 length)."""
    gen_device = "cpu" if pipe.device.type == "mps" else pipe.device
    generators = [torch.Generator(gen_device).manual_seed(image_seed(seed, i, j)) for i, j in pairs]
    out = pipe(
        prompt=[prompts[i] for i, _ in pairs],
        # As the family passes a negative prompt to its pipeline (FLUX.2's take none, or only its embeddings)
        **(negative_kwargs or {}),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        **({"eta": eta} if eta else {}),  # 0 is every sampler's default; the flow-matching pipelines take none
        generator=generators,
        output_type="pt",
        **(pipeline_kwargs or {}),
    )
    return out.images.float().clamp(0, 1).cpu()


def _evaluate_model(
    pipe,
    label: str,
    settings: EvalSettings,
    reward: Callable,
    diversity: Diversity,
    size: tuple[int, int],
    pipeline_kwargs: Mapping[str, Any] | None = None,
    negative_kwargs: Callable[[str, int], dict] | None = None,
) -> tuple[dict, list[dict], list[dict], torch.Tensor | None]:
    """One row's numbers: its summary, per-prompt and per-image records, and its grid images (if any)."""
    s, prompts = settings, settings.prompts
    pairs = [(i, j) for i in range(len(prompts)) for j in range(s.seeds_per_prompt)]
    pending: dict[int, list[torch.Tensor]] = {}  # a prompt's images until all its seeds are in
    rewards = torch.empty(len(pairs))
    per_prompt, grid = [], []
    for start in range(0, len(pairs), s.batch_size):
        batch = pairs[start:start + s.batch_size]
        images = generate(pipe, prompts, batch, s.seed, s.num_inference_steps, s.guidance_scale, *size,
                          negative_kwargs=negative_kwargs(s.negative_prompt or "", len(batch)) if negative_kwargs else None,
                          eta=s.eta, pipeline_kwargs=pipeline_kwargs)
        with torch.no_grad():
            scores = reward(images.to(diversity.device), [prompts[i] for i, _ in batch])
        rewards[start:start + len(batch)] = scores.detach().float().cpu()
        for (i, _), image in zip(batch, images, strict=True):
            pending.setdefault(i, []).append(image)
            if len(pending[i]) == s.seeds_per_prompt:
                stack = torch.stack(pending.pop(i))
                if i < s.grid_prompts:
                    grid.append(stack)
                r = rewards[i * s.seeds_per_prompt:(i + 1) * s.seeds_per_prompt]
                per_prompt.append({"model": label, "prompt_index": i, "prompt": prompts[i],
                                   "reward_mean": float(r.mean()), "diversity": diversity(stack)})
    per_image = [{"model": label, "prompt_index": i, "seed_index": j, "seed": image_seed(s.seed, i, j),
                  "prompt": prompts[i], "reward": float(r)} for (i, j), r in zip(pairs, rewards, strict=True)]
    div = torch.tensor([p["diversity"] for p in per_prompt])
    row = {
        "model": label,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "diversity": float(div.mean()),
        "diversity_std": float(div.std()) if len(div) > 1 else 0.0,
    }
    return row, per_prompt, per_image, (torch.cat(grid) if grid else None)


def _load_adapters(pipe, adapters: Sequence[Adapter]) -> list[str]:
    """Load LoRAs into the pipeline as named adapters; their names, in order (weights: diffusers' set_adapters)."""
    from diffusers.utils import logging as diffusers_logging

    names = []
    for k, adapter in enumerate(adapters):
        name = f"draftplus_{k}"  # adapter names become module keys: no dots or slashes
        try:
            # UNet-only LoRAs make diffusers warn that the text encoder got none: expected, and checked below.
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()
            try:
                with warnings.catch_warnings():  # a mix's second adapter: several adapters are the point
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    pipe.load_lora_weights(str(adapter.file.parent), weight_name=adapter.file.name, adapter_name=name)
            finally:
                diffusers_logging.set_verbosity(verbosity)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise EvaluationError(f"LoRA {adapter.label!r} ({adapter.file}) does not load into this base model: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            # diffusers only warns when no key matches: we would silently report the base model.
            raise EvaluationError(f"LoRA {adapter.label!r} ({adapter.file}) has no weights for this base model's "
                                  "denoiser or text encoder")
        names.append(name)
    return names


def _same_paths(a: str, b: str) -> bool:
    """Two `;`-separated path lists (a row's `path`) name the same files."""
    return [Path(p).resolve() for p in a.split(";")] == [Path(p).resolve() for p in b.split(";")]


def _rows_to_compute(variants: list[Variant], previous: Evaluation, results: Path | None, spell: Callable[[str], str],
                     log: Callable[[str], None]) -> list[Variant]:
    """The variants not already in `previous` with the same LoRA files and bytes. The same label for
    another LoRA (two runs' checkpoint-10) is refused; a LoRA whose bytes changed is computed again."""
    done = {row["model"]: row for row in previous.rows}
    todo = []
    for v in variants:
        old = done.get(v.label)
        if old is not None and v.path is not None and not _same_paths(old.get("path", ""), v.path):
            raise EvaluationError(f"row {v.label!r} in {results} was computed from {old.get('path')}, not {v.path}; "
                                  f"use {spell('overwrite')} or another {spell('output_dir')}")
        if old is None:
            todo.append(v)
        elif old.get("lora_sha256", "") != v.sha256:
            why = "its LoRA file changed since" if "lora_sha256" in old else "no LoRA hash recorded in"
            log(f"{v.label:>24}: {why} {results}: evaluated again")
            todo.append(v)
        else:
            log(f"{v.label:>24}: in {results}, skipped ({spell('overwrite')} recomputes)")
    return todo


def _add_row(out: Evaluation, row: dict, per_prompt: list[dict], per_image: list[dict]) -> None:
    """Add a row's records to `out`, replacing an earlier row of the same label in place."""
    label = row["model"]
    labels = [r["model"] for r in out.rows]
    if label in labels:
        out.rows[labels.index(label)] = row
        out.per_prompt[:] = [r for r in out.per_prompt if r["model"] != label]
        out.per_image[:] = [r for r in out.per_image if r["model"] != label]
    else:
        out.rows.append(row)
    out.per_prompt.extend(per_prompt)
    out.per_image.extend(per_image)


def evaluate(
    model: str,
    prompts: Sequence[str],
    reward: str | Callable = "redness",
    *,
    loras: Sequence[str | Path] = (),
    lora_scales: Sequence[float] = (),
    aig: Sequence[str] = (),
    mixes: Sequence[Sequence[str] | Mapping[str, float]] = (),
    include_base: bool = True,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda _: None,
    record: Mapping[str, Any] | None = None,
    spell: Callable[[str], str] = python_option,
    **settings: Any,
) -> Evaluation:
    """Score the base model, each LoRA and each control (LoRA scale, AIG schedule, mix) on the same
    prompts and seeds. See `Evaluation` for what comes back, `plan_variants` for the rows.

    `reward` is a spec for `rewards.build_reward` or a callable `(images [B,3,H,W] in [0,1], prompts) -> [B]`;
    every other setting is a keyword named as a field of `EvalSettings` (seeds_per_prompt, num_inference_steps,
    diversity_metric, reward_options, batch_size, device, grid_prompts, ...). With `output_dir`, the outputs
    are (re)written after every row, and rows already in its results.json are skipped (unless `overwrite`):
    the settings must then be the same. `record` is stored as results.json's "settings" (default: the
    settings and the rows asked for); `spell` names options in messages as the caller writes them.
    """
    spec = reward if isinstance(reward, str) else getattr(reward, "spec", getattr(reward, "__name__", "custom"))
    family_class = family_of_model(model)
    variants = plan_variants(loras, lora_scales, aig, mixes, include_base, spell)  # checks every LoRA and control
    resolved, from_runs = resolve_settings(model, family_class, settings,
                                           [a.file for v in variants for a in v.adapters], spell, log)
    config = EvalSettings(model, tuple(prompts), reward=spec, **resolved)
    if family_class is not None:
        check_sampler(family_class, config.scheduler, config.eta, spell)
    fingerprint = config.fingerprint()
    if record is None:
        record = {**config.record(), "loras": [str(p) for p in loras], "lora_scales": list(lora_scales),
                  "aig": list(aig), "mixes": [dict(m) if isinstance(m, Mapping) else list(m) for m in mixes],
                  "include_base": include_base}
    if from_runs:
        record = {**record, "settings_from_training_runs": from_runs}
    previous, results = Evaluation([], [], {}, []), None
    if output_dir is not None:
        check_output_dir(output_dir, spell)
        results = Path(output_dir) / "results.json"
        if not overwrite:
            previous = read_previous(output_dir, fingerprint, spell)
    todo = _rows_to_compute(variants, previous, results, spell, log)
    if not todo:
        return previous

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    diversity = Diversity(config.diversity_metric, device, config.diversity_model)  # fails fast without LPIPS
    if isinstance(reward, str):
        from rewards import build_reward

        reward = build_reward(reward, device=device, **config.reward_options)
    family = load_model_family(model, config.scheduler, device, config.torch_dtype, config.family_options)
    pipe = family.pipe
    # record the size actually generated, not "default"
    resolution = config.resolution or family.default_size()
    size = (config.height or resolution, config.width or resolution)
    common = {"reward": spec, "diversity_metric": config.diversity_metric,
              "diversity_model": config.diversity_model or "", "num_prompts": len(config.prompts),
              "seeds_per_prompt": config.seeds_per_prompt, "num_images": len(config.prompts) * config.seeds_per_prompt,
              "num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale,
              "resolution": resolution, "height": size[0], "width": size[1]}
    from utils.evaluation.aig import annealed_guidance

    out = Evaluation(list(previous.rows), list(previous.per_prompt), {}, list(previous.per_image))
    # The LoRA files in the pipeline now: a LoRA's rows (its scales, its AIG schedules) follow one another and
    # share one load, each setting its own adapter weights.
    loaded, names = (), []
    try:
        for variant in todo:
            files = tuple(a.file for a in variant.adapters)
            if files != loaded:
                if loaded:
                    pipe.unload_lora_weights()  # back to the base weights
                loaded = files  # before loading: a load that fails halfway is unloaded below
                names = _load_adapters(pipe, variant.adapters)
            if names:
                pipe.set_adapters(names, adapter_weights=[a.weight for a in variant.adapters])
            with annealed_guidance(pipe, variant.aig) if variant.aig else contextlib.nullcontext():
                row, prompt_rows, image_rows, grid = _evaluate_model(pipe, variant.label, config, reward, diversity,
                                                                     size, family.pipeline_kwargs(),
                                                                     family.negative_prompt_kwargs)
            row = {**row, "control": variant.control, "lora": variant.lora,
                   "lora_scale": "" if variant.lora_scale is None else variant.lora_scale,
                   "aig_schedule": variant.aig or "", "path": variant.path or model, "lora_sha256": variant.sha256,
                   **common}
            _add_row(out, {k: row[k] for k in ROW_FIELDS}, prompt_rows, image_rows)
            if grid is not None:
                out.grids[variant.label] = grid
            log(f"{variant.label:>24}: reward {row['reward_mean']:+.4f} ± {row['reward_std']:.4f}   "
                f"diversity ({config.diversity_metric}) {row['diversity']:.4f}")
            if output_dir is not None:  # after every row: an interruption loses at most the row in progress
                new_grid = {variant.label: grid} if grid is not None else {}
                write_outputs(output_dir, out._replace(grids=new_grid), dict(record), fingerprint)
    finally:
        if loaded:
            pipe.unload_lora_weights()
    return out
