"""Qwen-Image (`QwenImagePipeline`, tiny random pipeline): the rollout is the pipeline's (images bit for bit, square
and non-square, with and without true CFG, in bf16 too), a hand-written DRaFT+ step gives the same LoRA gradient,
its options and defaults are the pipeline's, and the LoRA it writes loads where people use it."""

import copy

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from lora_fixtures import randomise_lora_B, save_random_lora
from safetensors.torch import load_file

from utils.families import family_of, load_family
from utils.families.qwen_image import TEXT_STREAM_ONLY, QwenImage
from utils.lora import COMFYUI_WEIGHTS_NAME, LORA_WEIGHTS_NAME, add_lora
from utils.rollout.loop import Models, RolloutConfig, draftplus_step, rollout
from utils.rollout.vae_checkpointing import decoder_blocks, decoder_stages

PROMPTS = ["a red circle", "a photo of a big blue dog"]  # different lengths: the text mask is in play
SEQ = 16  # --max_sequence_length
NEGATIVE = "a green triangle"
# Qwen/Qwen-Image's transformer/config.json
QWEN_IMAGE = {"attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": False, "in_channels": 64,
              "joint_attention_dim": 3584, "num_attention_heads": 24, "num_layers": 60, "out_channels": 16,
              "patch_size": 2}


@pytest.fixture(scope="module")
def qwen(tiny_qwen_image_path):
    return load(tiny_qwen_image_path)


def load(path, **options):
    family = load_family(str(path), max_sequence_length=SEQ, **options)
    for module in (family.vae, family.denoiser, *family.text_encoders):
        module.requires_grad_(False)  # frozen, as the trainer has them
    return family


def models_of(family):
    scheduler = type(family.pipe.scheduler).from_config(family.pipe.scheduler.config)  # the rollout's own
    return Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                  scheduler=scheduler)


def noise_for(family, height, width, batch=2, seed=0):
    scale = family.vae_scale_factor
    return torch.randn(batch, family.latent_channels, height // scale, width // scale,
                       generator=torch.Generator().manual_seed(seed))


def mean_red(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


def test_the_family_serves_qwen_image_and_the_tiny_tokenizer_drops_the_templates_head(tiny_qwen_image_path, qwen):
    """QwenImagePipeline drops the first 34 tokens of its chat template (Qwen's tokenizer's count): the tiny
    tokenizer's too, so the prompt's tokens reach the transformer."""
    from utils.toys.tiny_qwen_image import PROMPT_TEMPLATE

    assert family_of(str(tiny_qwen_image_path)) is QwenImage and QwenImage.pipeline_class() is QwenImagePipeline
    pipe = qwen.pipe
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE and pipe.prompt_template_encode_start_idx == 34
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer(PROMPT_TEMPLATE.format("a red circle")).input_ids)
    assert tokens[33:37] == ["Ċ", "a", "Ġred", "Ġcircle"] and tokens[:2] == ["<|im_start|>", "system"]


# name -> (negative prompt, height, width): unguided (the pipeline's default call) and true CFG, square and not
CASES = {"unguided-48x32": ("", 48, 32), "true-cfg-48x32": (NEGATIVE, 48, 32), "true-cfg-space-32x32": (" ", 32, 32)}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("final_latent", ["sample", "x0"])
def test_rollout_images_equal_the_pipelines(case, final_latent, qwen):
    """Same noise, sigmas, conditioning (with its mask), true CFG with its norm rescale, packing and VAE
    normalisation: QwenImagePipeline's images bit for bit. The last sigma is 0, so x0 and sample agree."""
    negative, height, width = CASES[case]
    noise = noise_for(qwen, height, width)
    config = RolloutConfig(num_inference_steps=4, guidance_scale=0.0, final_latent=final_latent)
    cond = qwen.encode_prompts(PROMPTS, negative, config.guided)
    assert cond.guided == bool(negative) and "encoder_hidden_states_mask" in cond.cond  # padded: a mask
    with torch.no_grad():
        out = rollout(models_of(qwen), cond, noise, config, with_reference=False)
        expected = qwen.pipe(PROMPTS, negative_prompt=[negative] * 2 if negative else None, latents=qwen.pack(noise),
                             height=height, width=width, num_inference_steps=4, max_sequence_length=SEQ,
                             output_type="pt").images
    assert out.images.shape == (2, 3, height, width)
    torch.testing.assert_close(out.images, expected, rtol=0, atol=0)


def test_validation_samples_the_rollouts_latents_with_true_cfg(qwen):
    """`sample_latents` (validation's renderer: the pipeline from the noise the rollout draws for each seed, packed
    in, unpacked out, true CFG on with a negative prompt) gives the rollout's final latents."""
    from diffusers.utils.torch_utils import randn_tensor

    generators = [torch.Generator().manual_seed(3 + k) for k in range(2)]
    latents = qwen.sample_latents("a red circle", generators, negative_prompt=" ", num_inference_steps=3,
                                  guidance_scale=0.0, height=48, width=32)
    noise = randn_tensor(qwen.latent_shape(2, 48, 32), generator=[torch.Generator().manual_seed(3 + k)
                                                                  for k in range(2)])
    config = RolloutConfig(num_inference_steps=3, guidance_scale=0.0, final_latent="sample")
    with torch.no_grad():
        out = rollout(models_of(qwen), qwen.encode_prompts(["a red circle"] * 2, " "), noise, config,
                      with_reference=False)
    assert latents.shape == out.latents.shape == (2, 16, 12, 8)
    # (the pipeline encodes the prompt once and repeats it, the rollout encodes it per image: rounding apart)
    torch.testing.assert_close(latents, out.latents, rtol=0, atol=1e-5)


def test_bf16_rollout_latents_equal_the_pipelines(tiny_qwen_image_path):
    """In bf16: the timestep cast to the latents' dtype before / 1000, every Euler step summed in fp32."""
    family = load_family(str(tiny_qwen_image_path), dtype=torch.bfloat16, max_sequence_length=SEQ)
    noise = noise_for(family, 48, 32).bfloat16()
    config = RolloutConfig(num_inference_steps=3, guidance_scale=0.0)
    with torch.no_grad():
        out = rollout(models_of(family), family.encode_prompts(PROMPTS, NEGATIVE), noise, config, with_reference=False)
        expected = family.pipe(PROMPTS, negative_prompt=[NEGATIVE] * 2, latents=family.pack(noise), height=48,
                               width=32, num_inference_steps=3, max_sequence_length=SEQ, output_type="latent").images
    assert out.latents.dtype == torch.bfloat16 and torch.equal(family.pack(out.latents), expected)


def test_sigma_schedule_is_the_pipelines(qwen):
    """linspace(1, 1/T, T) under the exponential shift mu (linear in the packed token count, Qwen-Image's
    base/max shift and sequence lengths), stretched to end at shift_terminal 0.02, then 0."""
    scheduler = copy.deepcopy(qwen.pipe.scheduler)
    qwen.set_timesteps(scheduler, 4, (12, 8))
    m = (0.9 - 0.5) / (8192 - 256)
    mu = 6 * 4 * m + 0.5 - m * 256
    t = np.linspace(1.0, 1 / 4, 4)
    shifted = np.exp(mu) / (np.exp(mu) + (1 / t - 1))
    stretched = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - 0.02))
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), stretched, rtol=1e-5)
    assert scheduler.sigmas[-1] == 0 and float(scheduler.sigmas[-2]) == pytest.approx(0.02, rel=1e-5)


# ------------------------------------------------------------- a hand-written DRaFT+ step (no family code)


def hand_qwen_step(pipe, noise, steps, true_cfg, kl_coeff):
    """Qwen-Image DRaFT+ by hand: pack, dynamic shift, true CFG with the per-token norm rescale, no-grad Euler
    prefix, graded last step, x0 decoded through latents_mean/std as one frame, the penalty on implied noises."""
    tr, vae = pipe.transformer, pipe.vae
    embeds, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=SEQ)
    negative, negative_mask = pipe.encode_prompt([NEGATIVE] * 2, max_sequence_length=SEQ)
    b, c, h, w = noise.shape
    x = noise.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    m = (0.9 - 0.5) / (8192 - 256)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=(h * w // 4) * m + 0.5 - m * 256)

    def v_at(x, t):
        def call(e, mask):
            return tr(hidden_states=x, timestep=t.expand(b) / 1000, encoder_hidden_states=e,
                      encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]

        cond, uncond = call(embeds, mask), call(negative, negative_mask)
        guided = uncond + true_cfg * (cond - uncond)
        return guided * cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            x = scheduler.step(v_at(x, t), t, x).prev_sample
    t, sigma = scheduler.timesteps[-1], scheduler.sigmas[-2]
    v = v_at(x, t)
    with torch.no_grad():
        tr.disable_adapters()
        v_ref = v_at(x, t)
        tr.enable_adapters()
    penalty = (v - v_ref).mul(1 - sigma).pow(2).mean()  # (1 - sigma)^2 times the velocity MSE
    x0 = (x - sigma * v).view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 1, h, w)
    mean = torch.tensor(vae.config.latents_mean).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, c, 1, 1, 1)
    images = vae.decode(x0 * std + mean).sample[:, :, 0]
    return -mean_red((images / 2 + 0.5).clamp(0, 1), PROMPTS).mean() + kl_coeff * penalty


def test_lora_gradient_equals_a_hand_written_draftplus_step(tiny_qwen_image_path):
    family = load(tiny_qwen_image_path, true_cfg_scale=3.0)
    params = add_lora(family.denoiser, rank=4, lora_alpha=8,
                      target_modules=family.target_modules(["attention+ff"], family.denoiser.config))
    randomise_lora_B(family.denoiser, seed=1)
    noise = noise_for(family, 48, 32)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=0.0)
    loss, _, penalty = draftplus_step(models_of(family), mean_red, PROMPTS, noise, config, kl_coeff=0.5,
                                      negative_prompt=NEGATIVE)
    assert penalty > 0  # the LoRA moved the prediction
    grads = torch.autograd.grad(loss, params)
    hand_loss = hand_qwen_step(family.pipe, noise, 3, 3.0, 0.5)
    torch.testing.assert_close(loss, hand_loss, rtol=1e-5, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads)  # no adapter on what reaches no output (the preset's point)
    for g, h in zip(grads, torch.autograd.grad(hand_loss, params), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)


def test_k2_and_draft_lv_give_gradients_and_shapes(tiny_qwen_image_path):
    family = load(tiny_qwen_image_path)
    params = add_lora(family.denoiser, rank=4, target_modules=family.target_modules(["attention"]))
    randomise_lora_B(family.denoiser, seed=1)
    noise = noise_for(family, 48, 32)
    for config, images, graded in ((RolloutConfig(num_inference_steps=3, guidance_scale=0.0, truncation_steps=2), 2, 2),
                                   (RolloutConfig(num_inference_steps=3, guidance_scale=0.0, lv_samples=3), 6, 1)):
        cond = family.encode_prompts(PROMPTS, NEGATIVE)
        out = rollout(models_of(family), cond, noise, config, generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (images, 3, 48, 32) and len(out.eps) == len(out.eps_ref) == graded
        grads = torch.autograd.grad(out.images[:, 0].mean(), params)
        assert all(g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------- options, defaults, presets


def args_for(**given):
    from types import SimpleNamespace

    defaults = {"resolution": 32, "height": 48, "width": 32, "guidance_scale": None, "true_cfg_scale": None,
                "negative_prompt": "", "max_sequence_length": None}
    return SimpleNamespace(**{**defaults, **given})


@pytest.mark.parametrize("given, problem", [
    ({}, None),
    ({"negative_prompt": " "}, None),
    ({"true_cfg_scale": 5.0, "negative_prompt": "blurry"}, None),
    ({"true_cfg_scale": 5.0}, "--true_cfg_scale needs --negative_prompt"),
    ({"true_cfg_scale": 1.0, "negative_prompt": "blurry"}, "--negative_prompt acts on Qwen-Image only with"),
    ({"guidance_scale": 4.0}, "--guidance_scale does not reach this model"),
    ({"max_sequence_length": 1025}, "--max_sequence_length must be between 1 and 1024"),
    ({"height": 40}, "--height must be a multiple of 16"),
])
def test_options_a_user_gives_are_honoured_or_refused_in_one_line(given, problem):
    found = QwenImage.option_problem(args_for(**given), QWEN_IMAGE)
    assert found == problem if problem is None else found.startswith(problem)


@pytest.mark.parametrize("extra, expected", [
    (["--true_cfg_scale", "5"], "--true_cfg_scale needs --negative_prompt"),
    (["--guidance_scale", "4"], "--guidance_scale does not reach this model"),
    (["--quantize_base", "nf4"], "--quantize_base nf4 (bitsandbytes 4-bit) needs a CUDA GPU"),
])
def test_bad_options_are_one_line_and_exit_2_before_the_model_loads(extra, expected, tiny_qwen_image_path, tmp_path,
                                                                     capsys):
    import train_draftplus

    if "--quantize_base" in extra and torch.cuda.is_available():
        pytest.skip("checks what a CPU-only machine refuses")
    with pytest.raises(SystemExit) as exit_info:
        train_draftplus.parse_args(["--pretrained_model_name_or_path", str(tiny_qwen_image_path), "--reward",
                                    "redness", "--resolution", "32", "--output_dir", str(tmp_path / "out"), *extra])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_defaults_are_the_pipelines_and_true_cfg_needs_a_negative_prompt(qwen):
    """QwenImagePipeline.__call__: 50 steps, true_cfg_scale 4 (guiding only with a negative prompt), 512 tokens,
    1024 x 1024 images (128 latent rows of 8-pixel VAE cells; the tiny VAE has factor 4)."""
    assert QwenImage.rollout_defaults(QWEN_IMAGE) == {"num_inference_steps": 50, "max_sequence_length": 512,
                                                      "guidance_scale": 0.0, "true_cfg_scale": 4.0}
    assert qwen.default_size() == 128 * 4 and qwen.true_cfg_scale == 4.0
    assert not qwen.encode_prompts(PROMPTS, "").guided and qwen.encode_prompts(PROMPTS, " ").guided
    assert QwenImage.evaluation_defaults(QWEN_IMAGE) == {"scheduler": "model", "num_inference_steps": 50,
                                                         "guidance_scale": 0.0}
    assert QwenImage.licenses["qwen/qwen-image"].id == "apache-2.0"


def test_presets_on_the_real_config_match_diffusers_lora_script():
    """`attention`: the image stream's to_q/to_k/to_v/to_out.0 of the 60 blocks (diffusers' Qwen-Image script's
    default); `attention+ff`: also the text stream's attention and both streams' MLPs, but not what in the last
    block only feeds the text stream (its text queries, to_add_out, txt_mlp: the output is the image stream);
    never the output layers. (PEFT's own matching of target names, on the real config's module names.)"""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(QWEN_IMAGE)
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    counts = []
    for preset in ("attention", "attention+ff"):
        config = LoraConfig(target_modules=QwenImage.target_modules([preset], QWEN_IMAGE))
        names = {n for n in linears if check_target_module_exists(config, n)}
        assert not {"proj_out", "img_in", "txt_in", "norm_out.linear"} & names
        counts.append(len(names))
        assert not any(n.startswith("transformer_blocks.59.") and n.endswith(TEXT_STREAM_ONLY) for n in names)
    assert counts == [60 * 4, 60 * 12 - 4]
    with pytest.raises(ValueError, match="num_layers"):
        QwenImage.target_modules(["attention+ff"], None)


# ------------------------------------------------------------- the LoRA files


def render(pipe):
    with torch.no_grad():
        return pipe("a red circle", negative_prompt=" ", height=48, width=32, num_inference_steps=3,
                    max_sequence_length=SEQ, generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_the_lora_loads_in_qwen_image_pipeline_and_the_comfyui_file_has_every_modules_alpha(tiny_qwen_image_path,
                                                                                           tmp_path):
    """pipe.load_lora_weights(dir) loads the diffusers file at its alpha and changes the images; the ComfyUI file
    is that file plus the real alpha of every module (ComfyUI's Qwen-Image key map takes `transformer.<module>`).
    QwenImagePipeline refuses the ComfyUI file (its alpha keys send it down a conversion path that finds no
    module): what the model card tells diffusers users."""
    from peft.utils.error import NoMatchingPeftModuleError

    lora = save_random_lora(tiny_qwen_image_path, tmp_path / "run", rank=4, alpha=8, strength=2.0)
    written = QwenImage.export_ui_lora(lora / LORA_WEIGHTS_NAME)
    assert written == lora / COMFYUI_WEIGHTS_NAME == lora / QwenImage.ui_lora_name
    plain, comfy = load_file(lora / LORA_WEIGHTS_NAME), load_file(written)
    modules = {k.removesuffix(".lora_A.weight") for k in plain if k.endswith(".lora_A.weight")}
    alphas = {k.removesuffix(".alpha"): v for k, v in comfy.items() if k.endswith(".alpha")}
    assert len(modules) == 2 * 4 and alphas.keys() == modules  # 2 blocks x the attention preset
    assert all(float(v) == 8.0 for v in alphas.values()) and all(k.startswith("transformer.") for k in comfy)
    assert {k for k in comfy if not k.endswith(".alpha")} == plain.keys()

    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image_path)
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    with pytest.raises(NoMatchingPeftModuleError):
        pipe.load_lora_weights(str(lora), weight_name=COMFYUI_WEIGHTS_NAME)
    assert not QwenImage.ui_lora_loads_in_diffusers
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(lora))
    config = next(iter(pipe.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)
    assert (render(pipe) - base).abs().max() > 1e-2  # the LoRA matters


# ------------------------------------------------------------- train_draftplus.py, as a user runs it


def test_the_card_of_a_qwen_image_lora_names_its_apache_license_and_the_file_comfyui_loads(tiny_qwen_image_path,
                                                                                           tmp_path, monkeypatch):
    """Qwen-Image's card is not on disk here: the license is named as Qwen/Qwen-Image declares it."""
    import huggingface_hub
    from test_model_card import make_args, parse

    from utils.run.model_card import model_card_text

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args = make_args(tiny_qwen_image_path, tmp_path / "out", "--negative_prompt", " ")
    args.pretrained_model_name_or_path = "Qwen/Qwen-Image"
    card = parse(model_card_text(args, "QwenImagePipeline", "me/qwen-lora", ui_lora=COMFYUI_WEIGHTS_NAME))
    assert card.data.base_model == "Qwen/Qwen-Image" and "qwen-image" in card.data.tags
    assert card.data.license == "apache-2.0" and "License: the base model's, `apache-2.0`" in card.text
    assert f"| `{COMFYUI_WEIGHTS_NAME}` | ComfyUI" in card.text
    assert "`QwenImagePipeline.load_lora_weights` refuses it: in diffusers, load" in card.text
    assert "| true CFG scale | 4 |" in card.text
    unguided = parse(model_card_text(make_args(tiny_qwen_image_path, tmp_path / "out2"), "QwenImagePipeline", None))
    assert "true CFG" not in unguided.text  # the default 4 acts only with a negative prompt


@pytest.mark.slow
def test_qwen_image_trains_resumes_and_its_lora_loads_into_the_qwen_image_pipeline(tiny_qwen_image_path, tmp_path):
    """`accelerate launch train_draftplus.py` with true CFG (--negative_prompt ' ') and live validation: rewards
    and a penalty in metrics.jsonl, the LoRA file and the ComfyUI file (an alpha for every module); resumed from
    checkpoint-1 it ends where the straight run does; the LoRA loads into QwenImagePipeline and changes its
    images; the evaluator scores it."""
    from test_flow_train import accelerate_launch, base_args, metrics

    def train(out, *extra):
        result = accelerate_launch(*base_args(tiny_qwen_image_path, out, "--max_train_steps", "2",
                                              "--checkpointing_steps", "1", "--negative_prompt", " ", *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    straight = tmp_path / "straight"
    result = train(straight, "--validation_prompts", "a red circle", "--num_validation_images", "2")
    assert [m["step"] for m in metrics(straight)] == [1, 2]
    assert metrics(straight)[1]["kl_penalty"] > 0 and all(m["reward"] < 0 for m in metrics(straight))
    assert f"LoRA for ComfyUI: {straight / COMFYUI_WEIGHTS_NAME}" in result.stdout
    plain, comfy = load_file(straight / LORA_WEIGHTS_NAME), load_file(straight / COMFYUI_WEIGHTS_NAME)
    modules = {k.removesuffix(".lora_A.weight") for k in plain if k.endswith(".lora_A.weight")}
    assert len(modules) == 2 * 12 - 4 and {k.removesuffix(".alpha") for k in comfy if k.endswith(".alpha")} == modules
    assert all(float(v) == 8.0 for k, v in comfy.items() if k.endswith(".alpha"))
    card = (straight / "README.md").read_text()
    assert "QwenImagePipeline" in card and "| true CFG scale | 4 |" in card

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    (resumed / "metrics.jsonl").write_text((straight / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    train(resumed, "--resume_from_checkpoint", "latest")
    assert metrics(resumed)[1]["reward"] == pytest.approx(metrics(straight)[1]["reward"], rel=1e-5)
    lora_resumed = load_file(resumed / LORA_WEIGHTS_NAME)
    for key in plain:
        torch.testing.assert_close(lora_resumed[key], plain[key], rtol=1e-4, atol=1e-6)

    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image_path)
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe)
    pipe.load_lora_weights(str(straight))
    assert (render(pipe) - before).abs().max() > 1e-4

    from utils.evaluation import evaluate as ev

    result = ev.evaluate(str(tiny_qwen_image_path), PROMPTS, reward="redness", loras=[straight], lora_scales=[0],
                         aig=["base"], diversity_metric="pixel_l2", device="cpu", num_inference_steps=3, height=48,
                         width=32, seeds_per_prompt=2, negative_prompt=" ")
    rows = {r["model"]: r["reward_mean"] for r in result.rows}
    assert rows["straight@scale=0"] == pytest.approx(rows["base"], abs=1e-6)
    assert rows["straight@aig=base"] == pytest.approx(rows["base"], abs=1e-6)
    assert rows["straight"] != rows["base"]


@pytest.mark.slow
def test_two_process_gloo_run_with_compile_trains_qwen_image(tiny_qwen_image_path, tmp_path):
    """Real DDP over gloo with the no-grad transformer calls compiled (`aot_eager`): both ranks end with the same
    LoRA."""
    import os
    import subprocess
    import sys

    from test_flow_train import ROOT, SCRIPT, base_args, metrics

    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "DRAFTPLUS_COMPILE_BACKEND": "aot_eager"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29537", SCRIPT, *base_args(tiny_qwen_image_path, out, "--max_train_steps", "2",
                                                         "--checkpointing_steps", "2", "--compile",
                                                         "--negative_prompt", " ")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Num processes: 2" in result.stderr and [m["step"] for m in metrics(out)] == [1, 2]
    assert all(abs(a - b) > 1e-6 for a, b in (m["reward_by_process"] for m in metrics(out)))
    digests = {line.split("LoRA weights digest ")[1].split()[0] for line in result.stderr.splitlines()
               if "LoRA weights digest" in line}
    assert len(digests) == 1 and (out / LORA_WEIGHTS_NAME).is_file()


def test_gradient_checkpointing_checkpoints_the_vae_its_class_cannot(tiny_qwen_image_path, tiny_sd_path):
    """AutoencoderKLQwenImage refuses diffusers' gradient checkpointing, but the family decodes an image without
    its feature cache: --gradient_checkpointing checkpoints its decoder per up block as diffusers does a UNet
    family's, --vae_block_checkpointing per block."""
    qwen = load_family(str(tiny_qwen_image_path), max_sequence_length=SEQ)
    assert qwen.enable_gradient_checkpointing() == ["transformer", "vae"]
    assert qwen.denoiser.gradient_checkpointing
    assert [type(s).__name__ for s in decoder_stages(qwen.vae) if getattr(s, "_draftplus_checkpointed", False)] == [
        "QwenImageMidBlock", *["QwenImageUpBlock"] * len(qwen.vae.decoder.up_blocks)]
    per_block = load_family(str(tiny_qwen_image_path), max_sequence_length=SEQ)
    assert per_block.enable_gradient_checkpointing(vae_blocks=True) == ["transformer", "vae (per block)"]
    assert all(getattr(b, "_draftplus_checkpointed", False) for b in decoder_blocks(per_block.vae))
    sd = load_family(str(tiny_sd_path))
    assert sd.enable_gradient_checkpointing() == ["unet", "vae"]


@pytest.mark.parametrize("vae_blocks", [False, True], ids=["per_up_block", "per_block"])
def test_checkpointing_gives_the_same_images_and_lora_gradient(tiny_qwen_image_path, vae_blocks):
    """--gradient_checkpointing, with and without --vae_block_checkpointing: the rollout's images bit for bit and
    the LoRA gradient through the VAE decode as without checkpointing."""
    family = load(tiny_qwen_image_path, true_cfg_scale=3.0)
    params = add_lora(family.denoiser, rank=4, target_modules=family.target_modules(["attention"]))
    randomise_lora_B(family.denoiser, seed=1)
    noise = noise_for(family, 48, 32)
    config = RolloutConfig(num_inference_steps=2, guidance_scale=0.0)

    def images_and_grads():
        cond = family.encode_prompts(PROMPTS, NEGATIVE)
        images = rollout(models_of(family), cond, noise, config, generator=torch.Generator().manual_seed(0)).images
        return images.detach(), torch.autograd.grad(images[:, 0].square().mean(), params)

    images, grads = images_and_grads()
    family.enable_gradient_checkpointing(vae_blocks)
    images_ckpt, grads_ckpt = images_and_grads()
    assert torch.equal(images_ckpt, images)
    assert all(g.abs().sum() > 0 for g in grads)
    for g, h in zip(grads_ckpt, grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-9)
