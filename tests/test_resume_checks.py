"""A resume's checks on a flow model (utils/run/arg_checks.py check_resume / check_objective), against a
checkpoint made for the test: the LoRA file and the run config the trainer records, no training needed."""

import json

import pytest
from lora_fixtures import save_random_lora

import train_draftplus
from utils.run.checkpoints import RUN_CONFIG_NAME


def flow_args(model, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--reward", "redness", "--prompts", "animals",
            "--resolution", "32", "--num_inference_steps", "3", "--rank", "4", "--lora_alpha", "4",
            "--lora_target_modules", "to_q", "to_k", "to_v", "to_out.0", "--max_sequence_length", "16",
            "--output_dir", str(out), "--report_to", "none", *extra]


@pytest.fixture
def checkpointed(tiny_sd3_path, tmp_path):
    """An output dir with checkpoint-2 of a run with `flow_args` (--max_train_steps 2)."""
    out = tmp_path / "run"
    first = train_draftplus.parse_args(flow_args(tiny_sd3_path, out, "--max_train_steps", "2"))
    checkpoint = out / "checkpoint-2"
    save_random_lora(tiny_sd3_path, checkpoint, rank=4, alpha=4)
    (checkpoint / RUN_CONFIG_NAME).write_text(json.dumps(first.checked.run_config))
    return out


def resume(model, out, capsys, *extra):
    """parse_args for a resume: (the parsed args, None) or (None, its one error line)."""
    try:
        return train_draftplus.parse_args(flow_args(model, out, "--resume_from_checkpoint", "latest", *extra)), None
    except SystemExit as e:
        assert e.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return None, lines[0]


def test_a_flow_resume_with_another_flow_only_setting_is_refused(tiny_sd3_path, checkpointed, capsys):
    args, error = resume(tiny_sd3_path, checkpointed, capsys, "--max_train_steps", "4", "--max_sequence_length", "24")
    assert args is None and "checkpoint-2 was trained for another objective (--max_sequence_length 16 -> 24)" in error
    args, error = resume(tiny_sd3_path, checkpointed, capsys, "--max_train_steps", "4")
    assert error is None and args.checked.first_step == 2 and args.checked.objective_changes == ()


def test_a_resume_at_exactly_max_train_steps_is_accepted_and_one_below_refused(tiny_sd3_path, checkpointed, capsys):
    args, error = resume(tiny_sd3_path, checkpointed, capsys, "--max_train_steps", "2")
    assert error is None and args.checked.first_step == 2  # nothing left to train: the run just finishes
    args, error = resume(tiny_sd3_path, checkpointed, capsys, "--max_train_steps", "1")
    assert args is None and "--max_train_steps 1 is below the step of" in error


def test_a_z_image_resume_with_other_cfg_settings_is_refused(tiny_z_image_path, tmp_path, capsys):
    """Z-Image's guidance options shape the graded images, so they are part of the objective."""
    out = tmp_path / "run"
    first = train_draftplus.parse_args(flow_args(tiny_z_image_path, out, "--max_train_steps", "2",
                                                 "--cfg_normalization", "1", "--cfg_truncation", "0.5"))
    checkpoint = out / "checkpoint-2"
    save_random_lora(tiny_z_image_path, checkpoint, rank=4, alpha=4)
    (checkpoint / RUN_CONFIG_NAME).write_text(json.dumps(first.checked.run_config))
    same = ("--max_train_steps", "4", "--cfg_normalization", "1")
    args, error = resume(tiny_z_image_path, out, capsys, *same, "--cfg_truncation", "0.9")
    assert args is None and "(--cfg_truncation 0.5 -> 0.9)" in error
    args, error = resume(tiny_z_image_path, out, capsys, "--max_train_steps", "4", "--cfg_truncation", "0.5")
    assert args is None and "(--cfg_normalization 1 -> 0)" in error
    args, error = resume(tiny_z_image_path, out, capsys, *same, "--cfg_truncation", "0.5")
    assert error is None and args.checked.first_step == 2
