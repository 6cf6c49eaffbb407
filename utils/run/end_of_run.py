"""The end of a training run, after the final LoRA is saved (main process): the last validation, the
before/after grid, the file for ComfyUI (and AUTOMATIC1111), the training curves, the model card and the
upload. Nothing here calls the denoiser or a text encoder but the validation, whose last render the trainer
has already made on every process of a sharded run (`Validation` keeps it): so nothing here all-gathers."""

from __future__ import annotations

import json
from pathlib import Path

from utils.run.output_dir import METRICS_NAME
from utils.run.validation import BEFORE_AFTER_NAME, VALIDATION_REWARD_NAME


def finish_run(args, accelerator, models, validation, repo_id: str | None, step: int, lora_file: Path,
               objective_changes=()) -> str:
    """Write everything besides the LoRA and the checkpoints; returns the summary to print.
    `objective_changes`: what resumes changed of the objective (for the card)."""
    from utils.evaluation.plan import file_sha256
    from utils.evaluation.run_settings import write_settings
    from utils.lora import adapted_modules
    from utils.run.model_card import ValidationSummary, push_to_hub, save_model_card
    from utils.run.plots import plot_training_curves

    out = Path(args.output_dir)
    # the file's own sha256, as `sha256sum` and the evaluator's lora_sha256 column give it
    lines = [f"LoRA for diffusers (pipe.load_lora_weights): {lora_file} (file sha256 {file_sha256(lora_file)})"]
    ui_lora = None
    if args.export_kohya:
        ui_lora = models.family.export_ui_lora(lora_file)
        lines.append(f"LoRA for {models.family.ui_lora_tools}: {ui_lora}")
    lines.append(f"metrics: {out / METRICS_NAME}")
    # beside the LoRA, how it samples: the evaluator uses these unless told otherwise
    lines.append(f"sampler settings: {write_settings(out, args.checked.sampling_settings)}")

    summary = None
    if validation is not None:
        after, before = validation(step), validation.render_base()
        validation.save_before_after(out / BEFORE_AFTER_NAME)
        summary = ValidationSummary(
            reward_before=float(before.rewards.mean()), reward_after=float(after.rewards.mean()),
            num_images=len(after.rewards), step=step, diversity_before=before.diversity,
            diversity_after=after.diversity, diversity_metric=validation.diversity_metric,
            grid=f"validation/step-{step}.png", widget=validation.save_widget_images())
        record = {"before": summary.reward_before, "after": summary.reward_after, "step": step,
                  "prompts": list(validation.prompts), "images_per_prompt": validation.per_prompt}
        if after.diversity is not None:
            record.update(diversity_before=before.diversity, diversity_after=after.diversity,
                          diversity_metric=validation.diversity_metric)
        (out / VALIDATION_REWARD_NAME).write_text(json.dumps(record))
        lines += [f"before/after grid: {out / BEFORE_AFTER_NAME} (validation grids: {validation.dir})",
                  f"validation reward ({summary.num_images} images, fixed seeds): "
                  f"{summary.reward_before:.4f} before -> {summary.reward_after:.4f} after"]

    curves = plot_training_curves(out)
    if curves is not None:
        lines.append(f"training curves: {curves}")
    card = save_model_card(out, args, models.family.pipeline_class_name, repo_id, summary,
                           ui_lora=ui_lora.name if ui_lora is not None else None,
                           curves=curves.name if curves is not None else None,
                           mixed_precision=accelerator.mixed_precision, objective_changes=objective_changes,
                           lora_modules=len(adapted_modules(models.raw_denoiser)))
    lines.append(f"model card: {card}")
    if args.push_to_hub:
        push_to_hub(out, repo_id, args.hub_token, args.logging_dir)
        lines.append(f"uploaded to https://huggingface.co/{repo_id}")
    return "\n".join(lines)
