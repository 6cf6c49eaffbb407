"""Bad input: one line, exit code 2, nothing written, before any model is loaded.

Most cases call `parse_args` in this process (the checks that need no model run there, and in the
same order on every rank); a few run the real command line, including the one check that needs the
UNet (LoRA targets that match no module) and a reward that fails to load after the models.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_draftplus.py")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine refuses")


def base_args(model, out):
    return ["--pretrained_model_name_or_path", str(model), "--reward", "redness", "--prompts", "animals",
            "--resolution", "32", "--num_inference_steps", "3", "--rank", "4", "--output_dir", str(out),
            "--report_to", "none", "--max_train_steps", "1"]


# name: (extra arguments, expected text of the one error line[, extra environment])
BAD_INPUTS = {
    # arguments and their combinations
    "unknown reward": (["--reward", "nosuchreward"], "nosuchreward"),
    "resolution not multiple of 8": (["--resolution", "30"], "multiple of 8"),
    "height not multiple of 8": (["--height", "36"], "--height"),
    "resolution 0": (["--resolution", "0"], "--resolution must be positive, got 0"),
    "a built-in toy's name mistyped": (["--pretrained_model_name_or_path", "toy-flw"],
                                      "model 'toy-flw' is neither a local directory nor a built-in toy; "
                                      "did you mean 'toy-flow'?"),
    "K larger than T": (["--truncation_steps", "4"], "--truncation_steps"),
    "DRaFT-LV with the final sample": (["--lv_samples", "2", "--final_latent", "sample"],
                                      "--lv_samples decodes its step's x0 prediction; leave --final_latent at x0"),
    "negative kl_coeff": (["--kl_coeff", "-0.1"], "--kl_coeff"),
    "bad reward option": (["--reward_options", "novalue"], "key=value"),
    "unknown reward option": (["--reward_options", "nosuchoption=1"], "nosuchoption"),
    "bad reward option value": (["--reward", "color", "--reward_options", "target=bleu"],
                                "reward 'color': unknown colour 'bleu'"),
    "rank not an integer": (["--rank", "abc"], "argument --rank: invalid int value: 'abc'"),
    "unknown sampler": (["--scheduler", "nosuch"], "argument --scheduler: invalid choice"),
    "learning_rate inf": (["--learning_rate", "inf"], "--learning_rate must be a finite number"),
    "learning_rate 0": (["--learning_rate", "0"], "--learning_rate must be > 0"),
    "eta nan": (["--eta", "nan"], "--eta must be a finite number"),
    "guidance_scale nan": (["--guidance_scale", "nan"], "--guidance_scale must be a finite number"),
    "max_grad_norm -1": (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
    "lora_alpha 0": (["--lora_alpha", "0"], "--lora_alpha must be > 0"),
    "lora_dropout 1": (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    "adam_beta1 1.5": (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1)"),
    "adam_beta2 1": (["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1)"),
    "adam_epsilon negative": (["--adam_epsilon=-1e-8"], "--adam_epsilon must be >= 0"),
    "weight decay nan": (["--adam_weight_decay", "nan"], "--adam_weight_decay must be a finite number"),
    "unknown lr_scheduler": (["--lr_scheduler", "nosuch"], "--lr_scheduler 'nosuch' is not one of"),
    "negative warm-up": (["--lr_warmup_steps", "-1"], "--lr_warmup_steps must be >= 0"),
    "negative seed": (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    "max_prompts 0": (["--max_prompts", "0"], "--max_prompts must be at least 1"),
    "max_nonfinite_steps 0": (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps must be at least 1"),
    "validation_steps without prompts": (["--validation_steps", "1"], "--validation_steps needs --validation_prompts"),
    "unknown report_to": (["--report_to", "nosuch"], "--report_to 'nosuch' is not one of"),
    "overwrite and resume": (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "give one"),
    # the device and the launch
    "fp16 on CPU": (["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a GPU"),
    "fp16 from the accelerate config on CPU": ([], "mixed_precision: fp16 (accelerate config) needs a GPU",
                                               {"ACCELERATE_MIXED_PRECISION": "fp16"}),
    "8-bit Adam on CPU": (["--use_8bit_adam"], "--use_8bit_adam (bitsandbytes' AdamW8bit) needs a CUDA GPU"),
    "4-bit base on CPU": (["--quantize_base", "nf4"], "--quantize_base nf4 (bitsandbytes 4-bit) needs a CUDA GPU"),
    "4-bit FLUX base on CPU": (["--pretrained_model_name_or_path", "{flux}", "--quantize_base", "nf4"],
                               "--quantize_base nf4 (bitsandbytes 4-bit) needs a CUDA GPU"),
    "torchrun on CPU without ACCELERATE_USE_CPU": ([], "only with ACCELERATE_USE_CPU=true",
                                                   {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}),
    "accelerate multi-CPU launch that starts one process": (
        [], "started one process here", {"ACCELERATE_USE_CPU": "True", "ACCELERATE_DYNAMO_BACKEND": "NO",
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}),
    # files, models, rewards and prompt sets
    "missing model path": (["--pretrained_model_name_or_path", "/nonexistent/model"], "does not exist"),
    "hub model not cached offline": (["--pretrained_model_name_or_path", "someone/not-cached-model"],
                                     "HF_HUB_OFFLINE is set; point --pretrained_model_name_or_path at a local copy"),
    "unsupported pipeline": (["--pretrained_model_name_or_path", "{kandinsky}"],
                             "KandinskyV22Pipeline pipelines are not supported"),
    "model's sampler cannot train": (["--pretrained_model_name_or_path", "{lcm}", "--scheduler", "model"],
                                     "LCMScheduler cannot serve a training rollout"),
    # the options of the families, and their size rules
    "unknown quantization": (["--quantize_base", "int3"], "argument --quantize_base: invalid choice"),
    "FLUX height not multiple of 16": (["--pretrained_model_name_or_path", "{flux}", "--height", "40"],
                                       "--height must be a multiple of 16 for FluxPipeline models, got 40"),
    "SD3 resolution not multiple of 16": (["--pretrained_model_name_or_path", "{sd3}", "--resolution", "24"],
                                          "--resolution must be a multiple of 16 for StableDiffusion3Pipeline models"),
    "true CFG on SD": (["--true_cfg_scale", "2"],
                       "StableDiffusionPipeline models do not take it"),
    "true CFG on SD3": (["--pretrained_model_name_or_path", "{sd3}", "--true_cfg_scale", "2", "--negative_prompt", "x"],
                        "StableDiffusion3Pipeline models do not take it"),
    "VAE blocks without checkpointing": (["--vae_block_checkpointing"],
                                         "--vae_block_checkpointing refines --gradient_checkpointing: give both"),
    "T5 length on SD": (["--max_sequence_length", "77"], "StableDiffusionPipeline models do not take it"),
    "T5 length above 512": (["--pretrained_model_name_or_path", "{flux}", "--max_sequence_length", "600"],
                            "--max_sequence_length must be between 1 and 512, got 600"),
    "FLUX true CFG without a negative prompt": (["--pretrained_model_name_or_path", "{flux}", "--true_cfg_scale", "2"],
                                                "--true_cfg_scale needs --negative_prompt"),
    "FLUX negative prompt without true CFG": (["--pretrained_model_name_or_path", "{flux}", "--negative_prompt", "blur"],
                                              "--negative_prompt acts on FLUX only with --true_cfg_scale > 1"),
    "guidance for FLUX.1-schnell": (["--pretrained_model_name_or_path", "{schnell}", "--guidance_scale", "3.5"],
                                    "--guidance_scale does not reach this model"),
    "DDIM for FLUX": (["--pretrained_model_name_or_path", "{flux}", "--scheduler", "ddim"],
                      "DDIMScheduler cannot serve a training rollout (supported: FlowMatchEulerDiscreteScheduler); "
                      "choose --scheduler model"),
    "missing weight variant": (["--variant", "fp16"], "has no fp16 weights"),
    "reward model not cached offline": (["--reward", "pickscore"],
                                        "reward 'pickscore' needs model 'yuvalkirstain/PickScore_v1' from the hub"),
    "reward model path missing": (["--reward", "pickscore", "--reward_options", "model=/nonexistent/clip"],
                                  "model='/nonexistent/clip' does not exist"),
    "pickapic offline": (["--prompts", "pickapic"], "is not in the local cache and HF_HUB_OFFLINE is set"),
    "empty prompt file": (["--prompts", "{empty}"], "no prompts"),
    "missing prompt file": (["--prompts", "{tmp}/missing.txt"], "does not exist"),
    "CSV without the prompt column": (["--prompts", "{nocolumn_csv}"], "has no prompt column"),
    "empty CSV": (["--prompts", "{empty_csv}"], "could not read prompts from"),
    "push_to_hub offline": (["--push_to_hub"], "--push_to_hub needs the hub, and HF_HUB_OFFLINE is set"),
    # the output directory and resuming
    "output_dir is a file": (["--output_dir", "{a_file}"], "is a file, not a directory"),
    "output_dir under a file": (["--output_dir", "{a_file}/run"], "cannot be created"),
    "fresh run into a previous run": (["--output_dir", "{previous}"], "holds a previous run (checkpoint-3"),
    "directory in use by a live run": (["--output_dir", "{busy}"], "is in use by another run (pid"),
    "missing resume dir": (["--resume_from_checkpoint", "{tmp}/checkpoint-9"], "does not exist"),
    "resume from a directory that is no checkpoint": (["--resume_from_checkpoint", "{tmp}"], "is not a checkpoint"),
    "resume with another rank": (["--resume_from_checkpoint", "{checkpoint}", "--rank", "8"],
                                 "checkpoint-3 was trained with --rank 4, not 8"),
    "resume with other targets": (["--resume_from_checkpoint", "{checkpoint}", "--lora_target_modules", "attention+ff"],
                                  "checkpoint-3 has LoRA on to_k to_out.0 to_q to_v, not"),
    "resume onto another base model": (["--resume_from_checkpoint", "{checkpoint}"], "was trained on '/elsewhere/sd'"),
    "resume latest with another alpha": (["--output_dir", "{previous}", "--resume_from_checkpoint", "latest",
                                          "--lora_alpha", "16"], "--lora_alpha 4, not 16"),
}
DEVICE_CASES = {"fp16 on CPU", "fp16 from the accelerate config on CPU", "8-bit Adam on CPU", "4-bit base on CPU",
                "4-bit FLUX base on CPU", "torchrun on CPU without ACCELERATE_USE_CPU"}


def test_the_table_is_wide():
    assert len(BAD_INPUTS) >= 30


def make_inputs(tmp_path, tiny_sd_path):
    """The files the table refers to."""
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "nocolumn.csv").write_text("name,n\nx,1\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "a_file").write_text("not a directory")
    for name, index in {"kandinsky": {"_class_name": "KandinskyV22Pipeline"},
                        "lcm": {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "LCMScheduler"]}
                        }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps(index))
    # flow-matching pipelines as the checks see them: model_index.json and the transformer's config, no weights
    flow_scheduler = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    for name, pipeline, transformer in (("sd3", "StableDiffusion3Pipeline", {"patch_size": 2}),
                                        ("flux", "FluxPipeline", {"guidance_embeds": True, "num_single_layers": 1}),
                                        ("schnell", "FluxPipeline", {"guidance_embeds": False, "num_single_layers": 1})):
        (tmp_path / name / "transformer").mkdir(parents=True)
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                                      "scheduler": flow_scheduler}))
        (tmp_path / name / "transformer" / "config.json").write_text(json.dumps(transformer))
    # a previous run with one checkpoint: rank 4, alpha 4, attention targets, trained on another model
    checkpoint = tmp_path / "previous" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"unet.x.lora_A.weight": torch.zeros(4, 8)}, checkpoint / "pytorch_lora_weights.safetensors")
    (checkpoint / "draftplus_run.json").write_text(json.dumps({
        "base_model": "/elsewhere/sd", "revision": None, "unet_config_sha256": "0" * 64, "rank": 4, "lora_alpha": 4,
        "target_modules": ["to_k", "to_out.0", "to_q", "to_v"]}))
    (tmp_path / "previous" / "metrics.jsonl").write_text('{"step": 1}\n')
    # a directory whose lock names a live process (this one)
    from utils.run.output_dir import LOCK_NAME, LockOwner

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / LOCK_NAME).write_text(json.dumps(LockOwner.me().__dict__))
    return dict(tmp=tmp_path, empty=tmp_path / "empty.txt", nocolumn_csv=tmp_path / "nocolumn.csv",
                empty_csv=tmp_path / "empty.csv", a_file=tmp_path / "a_file", kandinsky=tmp_path / "kandinsky",
                lcm=tmp_path / "lcm", previous=tmp_path / "previous", checkpoint=checkpoint, busy=tmp_path / "busy",
                sd3=tmp_path / "sd3", flux=tmp_path / "flux", schnell=tmp_path / "schnell")


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(root).rglob("*")}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_fast_with_one_line_and_exit_2(case, tiny_sd_path, tmp_path, monkeypatch, capsys):
    if case in DEVICE_CASES and torch.cuda.is_available():
        pytest.skip("checks what a CPU-only machine refuses")
    extra, expected, *env = BAD_INPUTS[case]
    for key, value in (env[0] if env else {}).items():
        monkeypatch.setenv(key, value)
    names = make_inputs(tmp_path, tiny_sd_path)
    extra = [e.format(**names) for e in extra]
    before = snapshot(tmp_path)
    import train_draftplus

    with pytest.raises(SystemExit) as exit_info:
        train_draftplus.parse_args(base_args(tiny_sd_path, tmp_path / "out") + extra)  # later flags win
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("train_draftplus.py: error:") and expected in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # nothing written
    assert not (tmp_path / "out").exists()


def run(cmd, **env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("extra, expected", [
    (["--rank", "x"], "argument --rank: invalid int value: 'x'"),
    (["--prompts", "{nocolumn_csv}"], "has no prompt column"),
    (["--lora_target_modules", "to_q", "no_such_module"], "--lora_target_modules: no UNet2DConditionModel module is named no_such_module"),
    (["--reward", "pickscore", "--reward_options", "model={tmp}"], "could not load"),
], ids=["argparse type", "prompt column", "LoRA targets (after the UNet is built)", "reward weights (after the UNet)"])
def test_command_line_bad_input_one_error_line_exit_2_no_output_dir(extra, expected, tiny_sd_path, tmp_path):
    names = make_inputs(tmp_path, tiny_sd_path)
    out = tmp_path / "new" / "out"
    result = run([sys.executable, SCRIPT, *base_args(tiny_sd_path, out), *[e.format(**names) for e in extra]])
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("train_draftplus.py: error:") and expected in errors[0], errors
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists()  # the run created its directory for the lock, and removed it


@pytest.mark.parametrize("size", [33, 40])
def test_a_flow_model_states_its_own_size_rule_first(size, tiny_sd3_path, tmp_path, capsys):
    """33 and 40 alike are refused with the family's rule (16), not a generic multiple of 8 first."""
    import train_draftplus

    with pytest.raises(SystemExit):
        train_draftplus.parse_args(base_args(tiny_sd3_path, tmp_path / "out") + ["--resolution", str(size)])
    assert capsys.readouterr().err.strip() == (f"train_draftplus.py: error: --resolution must be a multiple of 16 "
                                               f"for StableDiffusion3Pipeline models, got {size}")


def test_argparse_errors_are_one_line_too(capsys):
    import train_draftplus

    with pytest.raises(SystemExit) as exit_info:
        train_draftplus.parse_args(["--reward", "redness"])  # no model
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pretrained_model_name_or_path" in err[0] and "usage" not in err[0]


def test_bitsandbytes_options_on_a_gpu_without_the_package_name_the_install(monkeypatch):
    import importlib.util
    from types import SimpleNamespace

    from utils.run import arg_checks

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else find_spec(name))
    for option, args in (("--use_8bit_adam", {"use_8bit_adam": True, "quantize_base": None}),
                         ("--quantize_base nf4", {"use_8bit_adam": False, "quantize_base": "nf4"})):
        with pytest.raises(arg_checks.ArgumentError, match=f"^{option} needs bitsandbytes: pip install bitsandbytes$"):
            arg_checks.check_device_support(SimpleNamespace(mixed_precision=None, **args), env={})
