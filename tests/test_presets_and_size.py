"""What `--lora_target_modules` presets adapt (each family's `diffusers` preset is diffusers' DreamBooth LoRA
script's default), counted on FLUX.1-dev and SD3.5-Medium built from their public configs without weights; and
the image size a run defaults to: the model's native size, known from its configs before any weights load."""

import pytest
import torch

# The public transformer configs (hub: black-forest-labs/FLUX.1-dev and stabilityai/stable-diffusion-3.5-medium,
# transformer/config.json), less the keys the classes' defaults already have.
FLUX_1_DEV = {"attention_head_dim": 128, "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096,
              "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38, "patch_size": 1,
              "pooled_projection_dim": 768}
SD35_MEDIUM = {"attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
               "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
               "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
               "qk_norm": "rms_norm", "sample_size": 128}
# The default `target_modules` of diffusers' examples/dreambooth/train_dreambooth_lora_{flux,sd3}.py, as written there.
SCRIPT_TARGETS = {
    "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"],
    "sd3": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
            "attn.to_q", "attn.to_v"],
    "sdxl": ["to_k", "to_q", "to_v", "to_out.0"],
}


def peft_matches(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The modules PEFT adapts for a list of target names (its own matching rule)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=targets)
    return [name for name, _ in model.named_modules() if name and check_target_module_exists(config, name)]


@pytest.mark.parametrize("family_name, config, counts", [
    ("flux", FLUX_1_DEV, {"diffusers": 342, "attention": 266}),
    ("sd3", SD35_MEDIUM, {"diffusers": 191, "attention": 243}),
])
def test_presets_adapt_what_they_say_on_the_real_transformers(family_name, config, counts):
    """FLUX.1-dev: diffusers' script adapts 342 modules, `attention` 266 (no feed-forward layers); SD3.5-Medium:
    the script's `attn.` names leave the second attention alone (191), `attention`'s short names catch it (243)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from utils.families import FAMILIES

    family = next(f for f in FAMILIES if f.name == family_name)
    model_class = FluxTransformer2DModel if family_name == "flux" else SD3Transformer2DModel
    with torch.device("meta"):
        model = model_class(**config)
    for preset, count in counts.items():
        assert len(peft_matches(model, family.target_modules([preset], config))) == count, preset
    assert family.target_modules(["diffusers"], config) == SCRIPT_TARGETS[family_name]
    attn2 = [n for n in peft_matches(model, family.target_modules(["attention"], config)) if ".attn2." in n]
    assert len(attn2) == (52 if family_name == "sd3" else 0)  # 13 dual-attention blocks x 4 projections


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
    from utils.families.base import target_presets_help

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
