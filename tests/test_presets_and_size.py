"""What `--lora_target_modules` presets adapt (each family's `diffusers` preset is diffusers' DreamBooth LoRA
script's default; counted on FLUX.1-dev and SD3.5-Medium in test_flow_lora.py) and what the help says of them;
and the image size a run defaults to: the model's native size, known from its configs before any weights load."""

import pytest
import torch

# The default `target_modules` of diffusers' examples/dreambooth/train_dreambooth_lora_{flux,sd3}.py, as written there.
SCRIPT_TARGETS = {
    "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"],
    "sd3": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
            "attn.to_q", "attn.to_v"],
    "sdxl": ["to_k", "to_q", "to_v", "to_out.0"],
}


def test_the_diffusers_presets_are_the_scripts_lists():
    """train_text_to_image_lora.py (SD 1.x/2.x) adapts what train_dreambooth_lora_sdxl.py does."""
    from utils.families import FAMILIES

    by_name = {family.name: family for family in FAMILIES}
    for name, targets in {**SCRIPT_TARGETS, "sd": SCRIPT_TARGETS["sdxl"]}.items():
        assert by_name[name].target_modules(["diffusers"]) == targets, name


@pytest.mark.parametrize("fixture, family_name", [("tiny_flux_dev_path", "flux"), ("tiny_sd3_path", "sd3"),
                                                  ("tiny_sdxl_path", "sdxl")])
def test_the_diffusers_preset_adapts_the_modules_diffusers_script_adapts(fixture, family_name, request):
    """On the tiny models, with LoRA added as the trainer adds it: the adapted modules are exactly those the
    script's target list names (a module whose name ends in '.' + a target)."""
    from utils.families import load_family
    from utils.lora import adapted_modules, add_lora

    family = load_family(str(request.getfixturevalue(fixture)))
    add_lora(family.denoiser, rank=2, target_modules=family.target_modules(["diffusers"], dict(family.denoiser.config)))
    expected = [name for name, _ in family.denoiser.named_modules()
                if any(name.endswith("." + t) for t in SCRIPT_TARGETS[family_name]) and ".lora_" not in name
                and not name.endswith(".base_layer")]
    assert adapted_modules(family.denoiser) == expected and expected


def test_the_help_says_what_each_preset_adapts_per_family():
    from utils.families import FAMILIES
    from utils.families.help import target_presets_help

    text = target_presets_help()
    for family in FAMILIES:
        for preset, names in family.target_presets.items():
            line = next(line for line in text.splitlines() if line.startswith(f"'{preset}' on ")
                        and family.name in line.split(":")[0].removeprefix(f"'{preset}' on ").split("/"))
            assert " ".join(names) in line, (family.name, preset)


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path", "tiny_sd3_path", "tiny_flux_dev_path"])
def test_the_size_defaults_to_the_size_the_models_pipeline_defaults_to(fixture, request, tmp_path):
    """Without --resolution the run is at the model's native size, known at argument-check time from the configs,
    the size the model's own diffusers pipeline renders when not told."""
    import train_draftplus
    from utils.families import load_family

    model = str(request.getfixturevalue(fixture))
    args = train_draftplus.parse_args(["--pretrained_model_name_or_path", model, "--reward", "redness",
                                       "--output_dir", str(tmp_path / "out"), "--report_to", "none"])
    with torch.no_grad():  # what the pipeline renders when given no size
        height, width = load_family(model).pipe("a red circle", num_inference_steps=1, output_type="pt").images.shape[2:]
    native = height
    assert width == native
    assert (args.resolution, args.height, args.width, args.checked.native_size) == (native,) * 4
    given = train_draftplus.parse_args(["--pretrained_model_name_or_path", model, "--reward", "redness",
                                        "--resolution", "64", "--height", "32", "--output_dir", str(tmp_path / "o2"),
                                        "--report_to", "none"])
    assert (given.height, given.width, given.checked.native_size) == (32, 64, native)


def test_the_toys_native_size_is_what_the_readme_quickstarts_train_at():
    """The README's quickstarts pass --resolution 32: the toys' own size, so leaving it out changes nothing."""
    from utils.families import family_of, read_denoiser_config, read_native_size

    for toy in ("toy", "toy-flow"):
        assert read_native_size(toy, family_of(toy), read_denoiser_config(toy)) == 32
