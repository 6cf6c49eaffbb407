"""utils/run/model_card.py: a complete card (no placeholders, the right base model, YAML that parses)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from lora_fixtures import save_random_lora

import train_draftplus
from utils.lora import KOHYA_WEIGHTS_NAME
from utils.run.model_card import HUB_ALLOW_PATTERNS, ValidationSummary, model_card_text, save_model_card

PLACEHOLDERS = ("TODO", "[More Information Needed]", "More Information Needed", "{{", "}}")


def make_args(model, out, *extra):
    return train_draftplus.parse_args([
        "--pretrained_model_name_or_path", str(model), "--reward", "redness=1,brightness=0.5", "--prompts", "animals",
        "--resolution", "32", "--kl_coeff", "0.25", "--rank", "8", "--lora_alpha", "16", "--output_dir", str(out),
        *extra])


def parse(text):
    card = ModelCard(text)
    for placeholder in PLACEHOLDERS:
        assert placeholder not in text, placeholder
    return card


def test_hub_base_model_card_with_license_from_the_hub_cache(tiny_sd_path, tmp_path, monkeypatch):
    import huggingface_hub

    # a hub cache holding the base model's card, as after a download
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--base-model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "models--someone--base-model" / "refs").mkdir()
    (cache / "models--someone--base-model" / "refs" / "main").write_text("0123abcd")
    (snapshot / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags:\n- x\n---\n# base\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    args = make_args(tiny_sd_path, tmp_path / "out")
    args.pretrained_model_name_or_path = "someone/base-model"
    validation = ValidationSummary(reward_before=0.1234, reward_after=0.5678, num_images=8, step=40,
                                   diversity_before=0.3, diversity_after=0.2, diversity_metric="pixel_l2",
                                   grid="validation/step-40.png",
                                   widget=[("a blue circle", "validation/prompt-0.png"),
                                           ("a green square", "validation/prompt-1.png")])
    text = model_card_text(args, "StableDiffusionXLPipeline", "me/my-lora", validation, ui_lora=KOHYA_WEIGHTS_NAME,
                           curves="training_curves.png", mixed_precision="bf16")
    card = parse(text)
    assert card.data.base_model == "someone/base-model"
    assert card.data.license == "creativeml-openrail-m"
    assert set(card.data.tags) >= {"lora", "diffusers", "diffusers-training", "text-to-image", "draftplus",
                                   "stable-diffusion-xl", "redness", "brightness"}
    assert card.data.widget == [{"text": "a blue circle", "output": {"url": "validation/prompt-0.png"}},
                                {"text": "a green square", "output": {"url": "validation/prompt-1.png"}}]
    body = card.text
    assert 'StableDiffusionXLPipeline.from_pretrained("someone/base-model")' in body
    assert 'pipe.load_lora_weights("me/my-lora")' in body
    assert "adapter_weights=[0.5]" in body and 'aig_pipeline(pipe, "power_2")' in body  # the two dials
    assert "| mean reward | 0.1234 | 0.5678 |" in body and "0.3000 | 0.2000" in body
    assert "validation/step-40.png" in body and "training_curves.png" in body
    assert "pytorch_lora_weights_kohya.safetensors" in body
    for setting in ("0.25", "rank 8, alpha 16", "redness=1,brightness=0.5", "bf16", "animals"):
        assert setting in body, setting


def test_toy_card_says_where_the_toy_lives_and_names_no_hub_id(tmp_path):
    args = make_args("toy", tmp_path / "out")
    card = parse(model_card_text(args, "StableDiffusionPipeline", None))
    assert card.data.base_model is None and card.data.license is None
    assert "toy" not in (card.data.to_dict().get("base_model") or "")
    assert 'from_pretrained("toy")' not in card.text
    assert "built-in toy model" in card.text and "assets/toy" in card.text
    assert 'from_pretrained(resolve_model_path("toy"))' in card.text
    assert 'load_lora_weights("out")' in card.text  # no repo: the local output dir, by name only
    assert str(tmp_path) not in card.text
    assert "## Validation" not in card.text  # no validation prompts: no made-up figures


def test_local_base_model_license_from_its_readme_and_no_base_model_id(tiny_sd_path, tmp_path):
    import shutil

    local = tmp_path / "my-model"
    shutil.copytree(tiny_sd_path, local)
    (local / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    args = make_args(local, tmp_path / "out")
    path = save_model_card(tmp_path, args, "StableDiffusionPipeline", None)
    card = ModelCard.load(path)
    assert card.data.base_model is None and card.data.license == "apache-2.0"
    assert 'from_pretrained("my-model")' in card.text and "local model directory" in card.text
    assert str(tmp_path) not in card.text


def test_upload_patterns_are_the_card_lora_and_pictures_only():
    import fnmatch

    def uploaded(name):
        return any(fnmatch.fnmatch(name, p) for p in HUB_ALLOW_PATTERNS)

    for name in ("README.md", "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors",
                 "validation/step-40.png", "validation/prompt-0.png", "training_curves.png",
                 "validation_before_after.png", "draftplus_settings.json"):
        assert uploaded(name), name
    for name in ("checkpoint-40/pytorch_lora_weights.safetensors", "checkpoint-40/optimizer.bin", "metrics.jsonl",
                 "logs/draftplus/events.out.tfevents.1", "validation.jsonl", ".tmp-lora-x/a.safetensors"):
        assert not uploaded(name), name


@pytest.mark.parametrize("spec, tags", [("pickscore", ["pickscore"]), ("redness=1,my.py:fn=0.1", ["redness",
                                                                                                  "custom-reward"])])
def test_reward_tags(spec, tags):
    from utils.run.model_card import reward_tags

    assert reward_tags(spec) == tags


def card_commands(text, language):
    """The code blocks of a card in `language`, each as one string."""
    blocks, inside = [], None
    for line in text.splitlines():
        if inside is None and line == f"```{language}":
            inside = []
        elif inside is not None and line == "```":
            blocks.append("\n".join(inside))
            inside = None
        elif inside is not None:
            inside.append(line)
    return blocks


def test_the_card_states_the_reward_with_its_options_and_an_evaluator_command_that_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run starts here; its output dir is relative, as in the README
    args = train_draftplus.parse_args(["--pretrained_model_name_or_path", "toy", "--reward", "color",
                                       "--reward_options", "target=blue", "--prompts", "animals", "--resolution", "32",
                                       "--num_inference_steps", "10", "--guidance_scale", "5", "--negative_prompt",
                                       "a dull photo", "--output_dir", "outputs/blue"])
    text = model_card_text(args, "StableDiffusionPipeline", None)
    card = parse(text)
    assert "# DRaFT+ LoRA: `color` with options `target=blue` on the draftplus toy model" in card.text
    assert "| reward | `color` with options `target=blue` |" in card.text
    assert 'load_lora_weights("outputs/blue")' in card.text  # relative to where the run started
    (command,) = card_commands(card.text, "bash")
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:3] == ["python", "-m", "utils.evaluation"]
    from utils.evaluation.cli import parse_args as evaluate_args

    parsed = evaluate_args(words[3:])  # it parses: every required argument is there
    assert (parsed.pretrained_model_name_or_path, parsed.prompts, parsed.reward, parsed.reward_options) == (
        "toy", "animals", "color", ["target=blue"])
    assert (parsed.num_inference_steps, parsed.guidance_scale, parsed.height, parsed.width, parsed.scheduler,
            parsed.negative_prompt) == (10, 5.0, 32, 32, "ddim", "a dull photo")
    assert parsed.lora == ["outputs/blue"] and parsed.lora_scale and parsed.aig
    assert "offline" in card.text and "--diversity_metric lpips_random_backbone" in card.text


def test_the_card_writes_no_path_of_the_machine_that_trained_it(tiny_sd_path, tmp_path):
    import shutil

    local = tmp_path / "models" / "my-model"
    shutil.copytree(tiny_sd_path, local)
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "my_reward.py").write_text("def blueness(images, prompts):\n    return images[:, 2].mean((1, 2))\n")
    args = train_draftplus.parse_args([
        "--pretrained_model_name_or_path", str(local), "--reward", f"redness=1,{tmp_path / 'my_reward.py'}:blueness=0.5",
        "--prompts", str(tmp_path / "prompts.txt"), "--resolution", "32", "--output_dir", str(tmp_path / "runs" / "a")])
    changes = [{"from_step": 7, "changes": {"--prompts": [str(tmp_path / "old.txt"), str(tmp_path / "prompts.txt")]}}]
    for ui_lora in (KOHYA_WEIGHTS_NAME, None):
        text = model_card_text(args, "StableDiffusionPipeline", None, ui_lora=ui_lora, objective_changes=changes)
        parse(text)
        assert str(tmp_path) not in text and "/tmp" not in text
    assert "`redness=1,my_reward.py:blueness=0.5`" in text and "`prompts.txt`" in text
    assert "from step 7: --prompts old.txt -> prompts.txt" in text
    assert 'from_pretrained("my-model")' in text and 'load_lora_weights("a")' in text
    assert "`my-model`, `a`" in text and "stand for paths outside it" in text  # and the card says so
    assert "python -m utils.run.export a" in text  # no kohya file: how to write it


def test_a_flux_dev_card_names_its_non_commercial_license_and_the_file_comfyui_loads(tiny_flux_dev_path, tmp_path,
                                                                                     monkeypatch):
    """FLUX.1-dev's card is not on disk here: the license is named as black-forest-labs/FLUX.1-dev declares it."""
    import huggingface_hub

    from utils.families import Flux
    from utils.lora import COMFYUI_WEIGHTS_NAME

    FLUX_1_DEV_LICENSE = Flux.licenses["black-forest-labs/flux.1-dev"]

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args = make_args(tiny_flux_dev_path, tmp_path / "out", "--resolution", "1024", "--max_sequence_length", "128")
    args.pretrained_model_name_or_path = "black-forest-labs/FLUX.1-dev"
    card = parse(model_card_text(args, "FluxPipeline", "me/flux-lora", ui_lora=COMFYUI_WEIGHTS_NAME))
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev" and "flux" in card.data.tags
    assert (card.data.license, card.data.license_name, card.data.license_link) == (
        "other", "flux-1-dev-non-commercial-license",
        "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md") == (
        FLUX_1_DEV_LICENSE.id, FLUX_1_DEV_LICENSE.name, FLUX_1_DEV_LICENSE.link)
    body = card.text
    assert "License: the base model's, [`flux-1-dev-non-commercial-license`](https://huggingface.co/" in body
    assert f"| `{COMFYUI_WEIGHTS_NAME}` | ComfyUI" in body and "AUTOMATIC1111" not in body
    assert "`FluxPipeline.load_lora_weights` loads it too" in body
    assert 'FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16)' in body
    assert "| prompt tokens (--max_sequence_length) | 128 |" in body
    (command,) = card_commands(body, "bash")
    from utils.evaluation.cli import parse_args as evaluate_args

    parsed = evaluate_args(shlex.split(command.replace("\\\n", " "))[3:])
    assert (parsed.scheduler, parsed.num_inference_steps, parsed.guidance_scale, parsed.eta) == ("model", 28, 3.5, None)
    assert (parsed.max_sequence_length, parsed.true_cfg_scale) == (128, 1.0)  # the run's, as it trained


def test_an_sd3_card_sends_diffusers_users_to_the_plain_file(tiny_sd3_path, tmp_path):
    from utils.lora import COMFYUI_WEIGHTS_NAME

    args = make_args(tiny_sd3_path, tmp_path / "out")
    body = parse(model_card_text(args, "StableDiffusion3Pipeline", None, ui_lora=COMFYUI_WEIGHTS_NAME)).text
    assert ("diffusers' `StableDiffusion3Pipeline.load_lora_weights` refuses it: in diffusers, load "
            "`pytorch_lora_weights.safetensors`") in body
    unexported = parse(model_card_text(args, "StableDiffusion3Pipeline", None)).text
    assert "wrote no file for ComfyUI (`--no_kohya_export`)" in unexported
    assert f"python -m utils.run.export out` writes `{COMFYUI_WEIGHTS_NAME}`" in unexported


def test_a_local_base_models_other_license_keeps_its_name(tiny_flux_dev_path, tmp_path):
    """A local FLUX.1-dev copy: its card's `license: other` with the license's name; a link relative to its own
    repository cannot be followed from the LoRA's, and is left out."""
    import shutil

    local = tmp_path / "FLUX.1-dev"
    shutil.copytree(tiny_flux_dev_path, local)
    (local / "README.md").write_text("---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\n"
                                     "license_link: LICENSE.md\n---\n# FLUX.1 [dev]\n")
    card = parse(model_card_text(make_args(local, tmp_path / "out"), "FluxPipeline", None))
    assert (card.data.license, card.data.license_name) == ("other", "flux-1-dev-non-commercial-license")
    assert card.data.license_link is None and card.data.base_model is None
    assert "License: the base model's, `flux-1-dev-non-commercial-license`;" in card.text


def evaluator_command_of(card_text):
    """The card's evaluate command, parsed by the evaluator's command line."""
    from utils.evaluation.cli import parse_args as evaluate_args

    (command,) = card_commands(card_text, "bash")
    return evaluate_args(shlex.split(command.replace("\\\n", " "))[3:])


@pytest.mark.parametrize("fixture, extra, absent", [
    ("tiny_sd_path", ["--negative_prompt", "a dull photo", "--eta", "0.5"], ["max_sequence_length", "true_cfg_scale"]),
    ("tiny_sd3_path", ["--negative_prompt", "a dull photo", "--max_sequence_length", "64"], ["true_cfg_scale"]),
    ("tiny_flux_dev_path", ["--negative_prompt", "a dull photo", "--true_cfg_scale", "2"], []),
    ("tiny_flux_schnell_path", [], ["guidance_scale", "negative_prompt"]),
])
def test_the_cards_evaluate_command_passes_the_runs_settings_and_none_the_family_refuses(fixture, extra, absent,
                                                                                       request, tmp_path):
    """The evaluator's options in the card are the ones recorded beside the LoRA (the run's sampler and its family's
    own options): FLUX's negative prompt comes with its true CFG scale, FLUX.1-schnell gets no guidance scale, and
    the evaluator's check of a family's options (the trainer's) passes them all."""
    from utils.evaluation.sampling import check_family_options, denoiser_config_of
    from utils.families import family_of

    model = str(request.getfixturevalue(fixture))
    args = make_args(model, tmp_path / "out", *extra)
    family = args.checked.family
    parsed = evaluator_command_of(model_card_text(args, family.pipeline_class_name, None))
    recorded = args.checked.sampling_settings
    assert {name: getattr(parsed, name) for name in recorded} == {
        name: None if name == "eta" and value == 0 else value for name, value in recorded.items()}
    for name in absent:
        assert getattr(parsed, name) is None and name not in recorded, name
    for name in (*family.options, "scheduler", "num_inference_steps", "height", "width"):
        assert getattr(parsed, name) == getattr(args, name), name
    check_family_options(family_of(model), denoiser_config_of(model), vars(parsed))  # raises if refused


def test_the_card_names_the_native_size_and_how_many_modules_the_lora_adapts(tiny_sd_path, tmp_path):
    native = make_args(tiny_sd_path, tmp_path / "a", "--resolution", "32")
    other = make_args(tiny_sd_path, tmp_path / "b", "--resolution", "48")
    assert native.checked.native_size == other.checked.native_size == 32
    assert "| resolution | 32x32 (the model's native size) |" in model_card_text(native, "StableDiffusionPipeline",
                                                                               None)
    text = model_card_text(other, "StableDiffusionPipeline", None, lora_modules=12)
    assert "| resolution | 48x48 (the model's native size is 32x32) |" in text
    assert "targets attention (12 unet modules)" in text


@pytest.mark.slow
@pytest.mark.parametrize("toy", ["toy", "toy-flow"])
def test_every_python_snippet_of_a_toys_card_runs_offline(toy, tmp_path):
    """The card's snippets, run in order as one script from the directory the training ran in (the draftplus
    repository on the path), offline: load the toy and the LoRA, render, turn the LoRA down, render with AIG."""
    from utils.toys.toy import resolve_model_path

    model = resolve_model_path(toy)
    class_name = json.loads((Path(model) / "model_index.json").read_text())["_class_name"]
    args = make_args(toy, tmp_path / "out")  # before the LoRA is there (the run's output dir is checked)
    save_random_lora(model, tmp_path / "out")
    card = parse(model_card_text(args, class_name, None, start=tmp_path))
    assert card.data.base_model is None and "huggingface.co/toy" not in card.content
    snippets = re.findall(r"```python\n(.*?)```", card.text, re.S)
    assert len(snippets) == 3
    script = "\n".join(snippets) + "\nassert pipe.get_active_adapters() == ['draftplus']\nimage.save('aig.png')\n"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "aig.png").is_file()
