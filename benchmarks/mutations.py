"""Mutation check: plant one-line bugs in a scratch copy of the repository and require the tests to catch each.

A test suite earns trust by failing on the bugs that matter. Each mutation below replaces one exact line
fragment (which must occur exactly once, so the list cannot silently go stale) in a fresh copy of the
tracked files, runs the tests that should catch it, and records whether they failed.

    python -m benchmarks.mutations                      # all mutations -> benchmarks/results/mutations.md/.json
    python -m benchmarks.mutations --only reward_sign   # one of them (its row in the results is updated)

Exit status 1 if any mutation survives (or no longer applies).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Mutation:
    name: str
    description: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids / -k expressions, run together


MUTATIONS = (
    Mutation("penalty_detached", "the DRaFT+ penalty detached from the graph (DRaFT+ silently becomes DRaFT)",
             "utils/rollout/loop.py",
             "penalty = kl_penalty(sample.eps, sample.eps_ref) if kl_coeff > 0",
             "penalty = kl_penalty([e.detach() for e in sample.eps], sample.eps_ref) if kl_coeff > 0",
             ("tests/test_rollout.py::test_penalty_alone_gives_the_lora_the_hand_computed_gradient",)),
    Mutation("reference_unguided", "the reference prediction taken without classifier-free guidance",
             "utils/rollout/loop.py",
             "reference = models.family.predict(no_grad_denoiser, x_t, t, cond, guidance_scale)",
             "reference = models.family.predict(no_grad_denoiser, x_t, t, cond, 1.0)",
             ("tests/test_rollout.py::test_reference_is_the_guided_prediction_of_the_adapters_off_unet",)),
    Mutation("reward_sign", "the reward maximised with the wrong sign",
             "utils/rollout/loop.py",
             "loss = -rewards.mean() + kl_coeff * penalty",
             "loss = rewards.mean() + kl_coeff * penalty",
             ("tests/test_rollout.py::test_lora_gradient_equals_a_hand_written_nemo_style_step",)),
    Mutation("process_index_dropped", "the process index dropped from the prompt and noise keys "
             "(every rank trains on the same samples)",
             "train_draftplus.py",
             "keys = (step, micro, accelerator.process_index)",
             "keys = (step, micro, 0)",
             ("tests/test_gradient_accumulation.py::test_each_micro_step_and_each_process_draws_its_own_prompts_and_noise",
              "tests/test_train.py::test_two_process_gloo_run_with_model_and_custom_rewards")),
    Mutation("micro_step_dropped", "the micro-step dropped from the prompt and noise keys (every micro-step of "
             "an update trains on the same samples)",
             "train_draftplus.py",
             "keys = (step, micro, accelerator.process_index)",
             "keys = (step, 0, accelerator.process_index)",
             ("tests/test_gradient_accumulation.py::test_each_micro_step_and_each_process_draws_its_own_prompts_and_noise",)),
    Mutation("accumulated_loss_not_averaged", "each micro-step's loss backpropagated whole (the update is the "
             "sum over micro-steps, not the mean)",
             "train_draftplus.py",
             "accelerator.backward(loss / count)",
             "accelerator.backward(loss)",
             ("tests/test_gradient_accumulation.py::"
              "test_the_accumulated_gradient_is_the_gradient_of_one_step_on_the_combined_batch",)),
    Mutation("accumulated_loss_averaged_twice", "each micro-step's loss divided by the accumulation count twice",
             "train_draftplus.py",
             "accelerator.backward(loss / count)",
             "accelerator.backward(loss / count / count)",
             ("tests/test_gradient_accumulation.py::"
              "test_the_accumulated_gradient_is_the_gradient_of_one_step_on_the_combined_batch",)),
    Mutation("lv_wrong_timestep", "DRaFT-LV re-noising to the second-to-last step's noise level",
             "utils/rollout/loop.py",
             "n, last = config.lv_samples, len(steps) - 1",
             "n, last = config.lv_samples, len(steps) - 2",
             ("tests/test_rollout.py::test_draft_lv_renoises_x0_to_the_last_steps_noise_level",)),
    Mutation("negative_prompt_ignored", "the negative prompt ignored by the rollout",
             "utils/rollout/loop.py",
             "cond = encode(prompts, negative_prompt, config.guided",
             "cond = encode(prompts, \"\", config.guided",
             ("tests/test_rollout.py::test_negative_prompt_reaches_the_rollout",)),
    Mutation("preprocess_mean_std_swapped", "the reward preprocessing's mean and std swapped",
             "rewards/preprocess.py",
             "x = (x - mean) / std",
             "x = (x - std) / mean",
             ("tests/test_rewards_models.py",)),
    Mutation("final_sample_decoded", "the scheduler's final sample decoded instead of the x0 prediction "
             "(NVIDIA's kl_coeff scale lost)",
             "utils/rollout/loop.py",
             'if i == n - 1 and config.final_latent == "x0":',
             'if i == n - 1 and config.final_latent == "never":',
             ("tests/test_rollout.py::test_lora_gradient_equals_a_hand_written_nemo_style_step",)),
    Mutation("lora_dropout_left_on", "PEFT's LoRA dropout kept as created, in training mode: it perturbs the no-grad "
             "prefix, the reference and every validation image",
             "utils/lora/adapters.py",
             "    _grad_only_dropout(denoiser)\n",
             "",
             ("tests/test_rollout.py::test_lora_dropout_acts_in_the_graded_calls_only",)),
    Mutation("lora_dropout_saved", "the LoRA file records its training dropout: `pipe.load_lora_weights` renders "
             "with dropout on",
             "utils/lora/files.py",
             ',\n                  "lora_dropout": 0.0}',
             "}",
             ("tests/test_family.py::test_a_lora_trained_with_dropout_renders_without_it_in_diffusers",)),
    Mutation("lv_final_sample_accepted", "DRaFT-LV accepts --final_latent sample, and silently decodes x0",
             "utils/rollout/loop.py",
             'if self.lv_samples and self.final_latent != "x0":',
             "if False:",
             ("tests/test_rollout.py::test_draft_lv_refuses_the_schedulers_final_sample",)),
    Mutation("flow_noise_misread", "the noise implied by a flow model's velocity taken as x + sigma v instead of "
             "x + (1 - sigma) v (the penalty compares the wrong quantity)",
             "utils/rollout/parametrisation.py",
             "return x_t.float() + (1 - self.sigmas[i]) * prediction",
             "return x_t.float() + self.sigmas[i] * prediction",
             ("tests/test_flow_rollout.py::test_reference_is_the_guided_prediction_of_the_adapters_off_transformer",)),
    Mutation("flux_timestep_unscaled", "FLUX's transformer called with the timestep in [0, 1000] instead of [0, 1]",
             "utils/families/flux.py",
             "timestep = t.expand(batch).to(x_t.dtype) / 1000",
             "timestep = t.expand(batch).to(x_t.dtype)",
             ("tests/test_flow_rollout.py::test_rollout_images_equal_the_pipelines",)),
    Mutation("flow_lv_renoise_unscaled", "DRaFT-LV on a flow model re-noising as x0 + sigma eps, off the "
             "model's (1 - sigma) x0 + sigma eps path",
             "utils/rollout/parametrisation.py",
             "((1 - sigma) * x0.float() + sigma * noise.float())",
             "(x0.float() + sigma * noise.float())",
             ("tests/test_flow_rollout.py::test_draft_lv_renoises_x0_to_the_last_sigma",)),
    Mutation("toy_built_for_its_family", "reading the toy's family builds (trains) the toy",
             "utils/families/model_files.py",
             "    path = str(TOYS[name_or_path].assets_dir) if name_or_path in TOYS else name_or_path",
             "    path = resolve_model_path(name_or_path)",
             ("tests/test_family.py::test_the_toys_family_is_read_without_building_it",)),
    Mutation("comfyui_text_stream_dropped", "the ComfyUI export of SD3/FLUX drops the text stream's modules "
             "(add_*_proj, to_add_out): ComfyUI renders half the LoRA",
             "utils/lora/exports.py",
             "    out = dict(state_dict)\n",
             '    out = {k: v for k, v in state_dict.items() if ".add_" not in k and ".to_add_out." not in k}\n',
             ("tests/test_comfyui.py::test_the_comfyui_file_is_the_diffusers_file_plus_the_real_alpha_of_every_module",)),
    Mutation("sd3_dynamic_shift_height_twice", "SD3's dynamic shift counts the image's tokens as height x height "
             "(a non-square image gets another schedule than the pipeline's)",
             "utils/families/sd3.py",
             'kwargs["mu"] = calculate_shift((latent_size[0] // patch) * (latent_size[1] // patch),',
             'kwargs["mu"] = calculate_shift((latent_size[0] // patch) * (latent_size[0] // patch),',
             ("tests/test_flow_rollout.py::test_sd3_dynamic_shift_sigmas_are_the_pipelines_on_a_non_square_image",)),
    Mutation("max_sequence_length_not_objective", "a resume of a flow model with another --max_sequence_length "
             "accepted silently (the T5 prompt length is no part of the recorded objective)",
             "utils/run/objective.py",
             '    "max_sequence_length": "--max_sequence_length",\n',
             "",
             ("tests/test_resume_checks.py::test_a_flow_resume_with_another_flow_only_setting_is_refused",)),
    Mutation("resume_at_max_steps_refused", "a resume from the checkpoint at exactly --max_train_steps refused "
             "(the boundary of the step check)",
             "utils/run/arg_checks.py",
             "    if args.max_train_steps < step:",
             "    if args.max_train_steps <= step:",
             ("tests/test_resume_checks.py::"
              "test_a_resume_at_exactly_max_train_steps_is_accepted_and_one_below_refused",)),
)


def tracked_copy(destination: Path) -> None:
    """The tracked files of the working tree (with uncommitted edits), as CI would check them out."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)


def run_tests(tests: list[str], scratch: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=scratch, env=env, capture_output=True, text=True)


def run_mutation(mutation: Mutation, scratch: Path) -> dict:
    path = scratch / mutation.file
    original = path.read_text()
    count = original.count(mutation.old)
    row = {"name": mutation.name, "description": mutation.description, "file": mutation.file,
           "tests": list(mutation.tests)}
    if count != 1:
        return {**row, "status": "does not apply", "detail": f"anchor found {count} times"}
    path.write_text(original.replace(mutation.old, mutation.new))
    try:
        start = time.time()
        result = run_tests(list(mutation.tests), scratch)
        lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
        summary = lines[-1] if lines else result.stderr.strip().splitlines()[-1:]
        caught = result.returncode == 1  # 1: tests failed; 0: survived; others: could not run
        status = "caught" if caught else ("survived" if result.returncode == 0 else "error")
        return {**row, "status": status, "seconds": round(time.time() - start, 1), "detail": str(summary)}
    finally:
        path.write_text(original)


def merged_with_earlier(rows: list[dict], path: Path) -> list[dict]:
    """A run of some mutations (--only) updates their rows and keeps the earlier rows of the others, so the
    results file always covers the whole list; rows of mutations no longer in the list are dropped."""
    earlier = {r["name"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
    fresh = {r["name"]: r for r in rows}
    return [fresh.get(m.name) or earlier[m.name] for m in MUTATIONS if m.name in fresh or m.name in earlier]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mutations", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="Names of the mutations to run (default: all).")
    p.add_argument("--output_dir", default=str(RESULTS), help="Where mutations.json/.md go.")
    args = p.parse_args(argv)
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="draftplus-mutants-") as tmp:
        scratch = Path(tmp)
        tracked_copy(scratch)
        # "Caught" must mean caught because of the mutation: the same tests pass on the unmutated copy.
        baseline = run_tests(sorted({t for m in chosen for t in m.tests}), scratch)
        print(f"baseline (unmutated): {baseline.stdout.strip().splitlines()[-1:]}", flush=True)
        if baseline.returncode != 0:
            print(baseline.stdout[-3000:], file=sys.stderr)
            return 2
        for mutation in chosen:
            row = run_mutation(mutation, scratch)
            print(f"{row['status']:>14}: {mutation.name} ({row.get('seconds', '-')} s) {row['detail']}", flush=True)
            rows.append(row)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ran, rows = rows, merged_with_earlier(rows, out / "mutations.json")
    (out / "mutations.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Mutation check", "", "`python -m benchmarks.mutations`: one-line bugs planted in a scratch copy; "
             "each must make the listed tests fail (which all pass on the unmutated copy first).", "",
             "| mutation | what it breaks | tests | result |", "| --- | --- | --- | --- |"]
    for row in rows:
        tests = "<br>".join(f"`{t.split('::')[-1]}`" for t in row["tests"])
        lines.append(f"| `{row['name']}` | {row['description']} | {tests} | {row['status']} |")
    caught = sum(r["status"] == "caught" for r in rows)
    lines += ["", f"{caught} of {len(rows)} mutations caught."]
    (out / "mutations.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["status"] == "caught" for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
