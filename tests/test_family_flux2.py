"""FLUX.2 [dev] and [klein] (tiny random pipelines): the rollout's images are the pipelines' own, bit for bit (square
and non-square; [dev]'s distilled guidance, [klein] base's classifier-free guidance with the empty or a negative
prompt, unguided, and a step-distilled [klein]); a hand-written DRaFT+ step gives the same LoRA gradient; the
presets, defaults and one-line refusals; the LoRA in the pipelines and the ComfyUI file; a training run."""

import json
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from lora_fixtures import randomise_lora_B

from utils.families import load_family, read_denoiser_config
from utils.families.flux2 import Flux2, Flux2Klein
from utils.lora import add_lora
from utils.rollout.loop import Models, RolloutConfig, draftplus_step, rollout

PROMPTS = ["a red circle", "a blue square"]
SEQ = 96  # [dev]'s system message is ~75 tokens of the tiny tokenizer: the prompt must fit after it
NEGATIVE = "a green triangle"


def load(path, distilled=False):
    family = load_family(str(path), max_sequence_length=SEQ)
    if distilled:  # a step-distilled [klein]: the same weights, the pipeline's flag
        family.pipe.register_to_config(is_distilled=True)
    for module in (family.vae, family.denoiser, *family.text_encoders):
        module.requires_grad_(False)  # frozen, as the trainer has them
    return family


_SHARED = {}


def shared(path):
    """The family of `path`, loaded once for the tests that change nothing in it (loading is much of their time)."""
    if str(path) not in _SHARED:
        _SHARED[str(path)] = load(path)
    return _SHARED[str(path)]


def models_of(family):
    scheduler = type(family.pipe.scheduler).from_config(family.pipe.scheduler.config)  # the rollout's own
    return Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                  scheduler=scheduler)


def noise_for(family, height=48, width=32, seed=0):
    return torch.randn(family.latent_shape(len(PROMPTS), height, width), generator=torch.Generator().manual_seed(seed))


def mean_red(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


def add_random_lora(family, preset="attention+ff", seed=1):
    params = add_lora(family.denoiser, rank=4, lora_alpha=8,
                      target_modules=family.target_modules([preset], family.denoiser.config))
    randomise_lora_B(family.denoiser, seed=seed)
    return params


# name -> (fixture, distilled, guidance_scale, negative prompt)
CASES = {
    "dev": ("tiny_flux2_dev_path", False, 4.0, ""),
    "klein-cfg": ("tiny_flux2_klein_path", False, 4.0, ""),
    "klein-cfg-negative": ("tiny_flux2_klein_path", False, 3.0, NEGATIVE),
    "klein-unguided": ("tiny_flux2_klein_path", False, 1.0, ""),
    "klein-distilled": ("tiny_flux2_klein_path", True, 4.0, ""),  # the pipeline ignores the guidance
}


@pytest.mark.parametrize("case,height,width", [(case, 48, 32) for case in CASES] +  # non-square: every case
                         [("dev", 32, 32), ("klein-cfg", 32, 32)])
def test_rollout_images_equal_the_pipelines(case, height, width, request):
    """Same noise, sigmas (the empirical mu), conditioning and denoiser calls: the pipeline's images, bit for bit,
    with --final_latent sample."""
    fixture, distilled, guidance, negative = CASES[case]
    path = request.getfixturevalue(fixture)
    family = load(path, distilled) if distilled else shared(path)
    noise = noise_for(family, height, width)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=guidance, final_latent="sample")
    with torch.no_grad():
        out = rollout(models_of(family), family.encode_prompts(PROMPTS, negative, config.guided), noise, config,
                      with_reference=False)
        extra = {}
        if negative:  # Flux2KleinPipeline takes the negative prompt as embeddings only
            extra["negative_prompt_embeds"] = family.pipe.encode_prompt([negative] * 2, max_sequence_length=SEQ)[0]
        expected = family.pipe(prompt=PROMPTS, latents=noise.clone(), height=height, width=width,
                               num_inference_steps=3, guidance_scale=guidance, max_sequence_length=SEQ,
                               output_type="pt", **extra).images
    assert out.images.shape == (2, 3, height, width)
    torch.testing.assert_close(out.images, expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("fixture,guidance", [("tiny_flux2_dev_path", 4.0), ("tiny_flux2_klein_path", 3.0)])
def test_bf16_rollout_latents_equal_the_pipelines(fixture, guidance, request):
    """In bf16 too (the timestep cast to the latents' dtype before / 1000, as the pipelines do). [klein] returns
    the VAE's input: compared there, after the rollout's own batch-norm and patch undoing."""
    from diffusers import Flux2Pipeline

    family = load_family(str(request.getfixturevalue(fixture)), dtype=torch.bfloat16, max_sequence_length=SEQ)
    noise = noise_for(family).bfloat16()
    config = RolloutConfig(num_inference_steps=3, guidance_scale=guidance, final_latent="sample")
    with torch.no_grad():
        out = rollout(models_of(family), family.encode_prompts(PROMPTS, "", config.guided), noise, config,
                      with_reference=False)
        expected = family.pipe(prompt=PROMPTS, latents=noise.clone(), height=48, width=32, num_inference_steps=3,
                               guidance_scale=guidance, max_sequence_length=SEQ, output_type="latent").images
    assert out.latents.dtype == torch.bfloat16
    if isinstance(family, Flux2Klein):
        mean, std = family._batch_norm(family.vae, out.latents)
        assert torch.equal(Flux2Pipeline._unpatchify_latents(out.latents * std + mean), expected)
    else:
        assert torch.equal(out.latents.flatten(2).transpose(1, 2), expected)


@pytest.mark.parametrize("fixture", ["tiny_flux2_dev_path", "tiny_flux2_klein_path"])
def test_validation_latents_are_the_pipelines_from_the_rollouts_noise(fixture, request):
    """`sample_latents` (validation) hands the rollout's noise to the pipeline, with the negative prompt as the
    pipeline takes it, and returns [B, C, h, w] latents: the rollout's own ([dev] returns tokens, [klein] the VAE's
    input; the pipeline encodes the prompt once, the rollout per image: rounding apart)."""
    family = shared(request.getfixturevalue(fixture))
    negative = NEGATIVE if isinstance(family, Flux2Klein) else ""
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    latents = family.sample_latents(PROMPTS[0], generators, negative_prompt=negative, num_inference_steps=3,
                                    guidance_scale=3.0, height=48, width=32)
    noise = torch.cat([torch.randn(family.latent_shape(1, 48, 32), generator=torch.Generator().manual_seed(s))
                       for s in (3, 4)])
    config = RolloutConfig(num_inference_steps=3, guidance_scale=3.0, final_latent="sample")
    with torch.no_grad():
        out = rollout(models_of(family), family.encode_prompts([PROMPTS[0]] * 2, negative, True), noise, config,
                      with_reference=False)
    torch.testing.assert_close(latents, out.latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(family.decode(family.vae, latents), out.images, rtol=0, atol=1e-5)


# ------------------------------------------------------------- a hand-written DRaFT+ step (no family code)


def hand_flux2_step(pipe, noise, steps, guidance, kl_coeff, guided):
    """FLUX.2 DRaFT+ by hand: tokens and 4-axis ids, the empirical shift, a no-grad Euler prefix, a graded last
    step (CFG on the empty prompt for [klein] base, the guidance input for [dev]), x0 decoded through the batch
    norm and the 2x2 patches, the penalty on the implied noises of the adapters-on and -off velocities."""
    tr, vae = pipe.transformer, pipe.vae
    b, c, h, w = noise.shape
    embeds = pipe.encode_prompt(PROMPTS, max_sequence_length=SEQ)[0]
    empty = pipe.encode_prompt(["", ""], max_sequence_length=SEQ)[0] if guided else None
    txt_ids = torch.zeros(b, embeds.shape[1], 4, dtype=torch.long)
    txt_ids[..., 3] = torch.arange(embeds.shape[1])
    img_ids = torch.zeros(h, w, 4, dtype=torch.long)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    img_ids = img_ids.reshape(1, h * w, 4).expand(b, -1, -1)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=compute_empirical_mu(h * w, steps))
    guide = torch.full((b,), guidance) if tr.config.guidance_embeds else None

    def call(x, t, text):
        return tr(hidden_states=x, timestep=t.expand(b) / 1000, guidance=guide, encoder_hidden_states=text,
                  txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

    def v_at(x, t):
        v = call(x, t, embeds)
        return call(x, t, empty) + guidance * (v - call(x, t, empty)) if guided else v

    x = noise.flatten(2).transpose(1, 2)
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            x = scheduler.step(v_at(x, t), t, x).prev_sample
    t, sigma = scheduler.timesteps[-1], scheduler.sigmas[-2]
    v = v_at(x, t)
    with torch.no_grad():
        tr.disable_adapters()
        v_ref = v_at(x, t)
        tr.enable_adapters()
    penalty = (v - v_ref).mul(1 - sigma).pow(2).mean()
    x0 = (x - sigma * v).transpose(1, 2).reshape(b, c, h, w)
    x0 = x0 * (vae.bn.running_var + vae.config.batch_norm_eps).sqrt().view(1, -1, 1, 1) \
        + vae.bn.running_mean.view(1, -1, 1, 1)
    x0 = x0.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)
    images = vae.decode(x0).sample
    return -mean_red((images / 2 + 0.5).clamp(0, 1), PROMPTS).mean() + kl_coeff * penalty


@pytest.mark.parametrize("fixture,guidance,guided", [("tiny_flux2_dev_path", 4.0, False),
                                                      ("tiny_flux2_klein_path", 3.0, True)])
def test_lora_gradient_equals_a_hand_written_flux2_draftplus_step(fixture, guidance, guided, request):
    family = load(request.getfixturevalue(fixture))
    params = add_random_lora(family)
    noise = noise_for(family)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=guidance)
    loss, _, penalty = draftplus_step(models_of(family), mean_red, PROMPTS, noise, config, kl_coeff=0.5)
    assert penalty > 0  # the LoRA moved the prediction
    grads = torch.autograd.grad(loss, params)
    assert all(g.abs().sum() > 0 for g in grads)
    hand_loss = hand_flux2_step(family.pipe, noise, 3, guidance, 0.5, guided)
    torch.testing.assert_close(loss, hand_loss, rtol=1e-5, atol=1e-6)
    for g, h in zip(grads, torch.autograd.grad(hand_loss, params), strict=True):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_k2_and_draft_lv_give_gradients_and_shapes(tiny_flux2_klein_path):
    family = load(tiny_flux2_klein_path)
    params = add_random_lora(family, preset="attention")
    for config, images, graded in ((RolloutConfig(num_inference_steps=3, guidance_scale=3.0, truncation_steps=2), 2, 2),
                                   (RolloutConfig(num_inference_steps=3, guidance_scale=3.0, lv_samples=2), 4, 1)):
        cond = family.encode_prompts(PROMPTS, "", config.guided)
        out = rollout(models_of(family), cond, noise_for(family), config, generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (images, 3, 48, 32) and len(out.eps) == len(out.eps_ref) == graded
        grads = torch.autograd.grad(out.images[:, 0].mean(), params)
        assert all(g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------- presets, defaults, refusals

# The transformers' configs as diffusers' conversion script writes them (scripts/convert_flux2_to_diffusers.py).
REAL = {"flux2-dev": {"num_layers": 8, "num_single_layers": 48}, "klein-4b": {"num_layers": 5, "num_single_layers": 20}}


@pytest.mark.parametrize("model", list(REAL))
def test_the_attention_preset_is_diffusers_scripts_default(model):
    """train_dreambooth_lora_flux2*.py: to_k/q/v, to_out.0, to_qkv_mlp_proj and every single block's attn.to_out."""
    single = [f"single_transformer_blocks.{i}.attn.to_out" for i in range(REAL[model]["num_single_layers"])]
    assert Flux2.target_modules(["attention"], REAL[model]) == ["to_k", "to_q", "to_v", "to_out.0",
                                                                 "to_qkv_mlp_proj", *single]
    with pytest.raises(ValueError, match="num_single_layers"):
        Flux2Klein.target_modules(["attention"], None)


def test_the_presets_adapt_the_linear_layers_they_name(tiny_flux2_dev_path):
    family = load(tiny_flux2_dev_path)
    add_random_lora(family)
    adapted = {n.split(".lora_A")[0] for n, _ in family.denoiser.named_parameters() if "lora_A" in n}
    expected = {f"transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                      "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                                      "attn.to_add_out", "ff.linear_in", "ff.linear_out",
                                                      "ff_context.linear_in", "ff_context.linear_out")}
    expected |= {f"single_transformer_blocks.{i}.attn.{m}" for i in (0, 1) for m in ("to_qkv_mlp_proj", "to_out")}
    assert adapted == expected


def test_defaults_and_distillation_come_from_the_models_files(tiny_flux2_dev_path, tiny_flux2_klein_path, tmp_path,
                                                              capsys):
    """The pipelines' own steps, guidance and sequence length; a step-distilled [klein] (`is_distilled` in its
    model_index.json) runs 4 steps and takes neither guidance nor a negative prompt."""
    dev = read_denoiser_config(str(tiny_flux2_dev_path))
    assert Flux2.rollout_defaults(dev) == {"num_inference_steps": 50, "guidance_scale": 4.0,
                                           "max_sequence_length": 512}
    base = read_denoiser_config(str(tiny_flux2_klein_path))
    assert base["_is_distilled"] is False and Flux2Klein.uses_guidance_scale(base)
    assert Flux2Klein.rollout_defaults(base)["num_inference_steps"] == 50
    distilled_path = tmp_path / "klein-distilled"
    shutil.copytree(tiny_flux2_klein_path, distilled_path)
    index = json.loads((distilled_path / "model_index.json").read_text())
    (distilled_path / "model_index.json").write_text(json.dumps({**index, "is_distilled": True}))
    distilled = read_denoiser_config(str(distilled_path))
    assert Flux2Klein.rollout_defaults(distilled)["num_inference_steps"] == 4
    assert not Flux2Klein.uses_guidance_scale(distilled)
    assert load(distilled_path).is_distilled
    capsys.readouterr()  # the loading's progress bars
    import train_draftplus

    for flags, expected in ((["--guidance_scale", "4"], "--guidance_scale does not reach this model"),
                            (["--negative_prompt", "blurry"], "--negative_prompt does not reach Flux2KleinPipeline")):
        with pytest.raises(SystemExit):
            train_draftplus.parse_args(["--pretrained_model_name_or_path", str(distilled_path), "--reward", "redness",
                                        "--output_dir", str(tmp_path / "out"), "--resolution", "32", *flags])
        (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert expected in line
    args = train_draftplus.parse_args(["--pretrained_model_name_or_path", str(distilled_path), "--reward", "redness",
                                       "--output_dir", str(tmp_path / "out"), "--resolution", "32"])
    assert (args.num_inference_steps, args.guidance_scale, args.max_sequence_length) == (4, 1.0, 512)


@pytest.mark.parametrize("fixture,flags,expected", [
    ("tiny_flux2_dev_path", ["--negative_prompt", "blurry"], "--negative_prompt does not reach Flux2Pipeline models"),
    ("tiny_flux2_dev_path", ["--height", "40"], "--height must be a multiple of 16"),
    ("tiny_flux2_klein_path", ["--true_cfg_scale", "2"], "Flux2KleinPipeline models do not take it"),
    ("tiny_flux2_klein_path", ["--max_sequence_length", "600"], "--max_sequence_length must be between 1 and 512"),
    pytest.param("tiny_flux2_klein_path", ["--quantize_base", "nf4"],
                 "--quantize_base nf4 (bitsandbytes 4-bit) needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU-only machine refuses")),
])
def test_options_a_flux2_pipeline_cannot_honour_are_one_line(fixture, flags, expected, request, tmp_path, capsys):
    import train_draftplus

    model = request.getfixturevalue(fixture)
    with pytest.raises(SystemExit) as exit_info:
        train_draftplus.parse_args(["--pretrained_model_name_or_path", str(model), "--reward", "redness",
                                    "--output_dir", str(tmp_path / "out"), "--height", "48", "--width", "32",
                                    "--report_to", "none", *flags])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], lines


# ------------------------------------------------------------- the model card's license


@pytest.mark.parametrize("hub_id,family,expected", [
    ("black-forest-labs/FLUX.2-dev", "Flux2Pipeline",
     ("other", "flux-dev-non-commercial-license", "https://huggingface.co/black-forest-labs/FLUX.2-dev/blob/main/LICENSE.txt")),
    ("black-forest-labs/FLUX.2-klein-9B", "Flux2KleinPipeline",
     ("other", "flux-non-commercial-license",
      "https://huggingface.co/black-forest-labs/FLUX.2-klein-9B/blob/main/LICENSE.md")),
    ("black-forest-labs/FLUX.2-klein-4B", "Flux2KleinPipeline", ("apache-2.0", None, None)),
])
def test_the_card_names_the_base_models_license(hub_id, family, expected, tiny_flux2_klein_path, tmp_path,
                                                monkeypatch):
    """The base model's card is not on disk here: its license is named as its hub repository declares it."""
    import huggingface_hub
    from test_model_card import make_args, parse

    from utils.lora import COMFYUI_WEIGHTS_NAME
    from utils.run.model_card import model_card_text

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    args = make_args(tiny_flux2_klein_path, tmp_path / "out", "--height", "48", "--width", "32")
    args.pretrained_model_name_or_path = hub_id
    card = parse(model_card_text(args, family, "me/lora", ui_lora=COMFYUI_WEIGHTS_NAME))
    assert (card.data.license, card.data.license_name, card.data.license_link) == expected
    assert card.data.base_model == hub_id and "flux2" in card.data.tags
    assert f"{family}.from_pretrained(\"{hub_id}\", dtype=torch.bfloat16)" in card.text


# ------------------------------------------------------------- training, as a user runs it, and everything after


@pytest.mark.slow
@pytest.mark.parametrize("fixture,pipeline_class,flags", [
    ("tiny_flux2_klein_path", Flux2KleinPipeline, ["--guidance_scale", "3", "--negative_prompt", "a blue square",
                                                   "--max_sequence_length", "32"]),
    ("tiny_flux2_dev_path", Flux2Pipeline, ["--max_sequence_length", str(SEQ), "--lora_target_modules", "attention"]),
])
def test_flux2_trains_and_its_lora_loads_in_the_pipeline_comfyui_and_the_evaluator(fixture, pipeline_class, flags,
                                                                                  request, tmp_path):
    """accelerate launch, 2 steps with live validation: rewards and the penalty logged, the LoRA loads into the
    family's diffusers pipeline at its alpha and changes its images, the ComfyUI file has every module's alpha,
    the card names the pipeline; the evaluator's LoRA row (and its AIG and scale rows) runs on it."""
    from safetensors.torch import load_file
    from test_flow_train import accelerate_launch, base_args, metrics

    from utils.evaluation import evaluate as ev
    from utils.lora import COMFYUI_WEIGHTS_NAME, LORA_WEIGHTS_NAME

    model, out = request.getfixturevalue(fixture), tmp_path / "run"
    result = accelerate_launch(*base_args(model, out, "--max_train_steps", "2", "--checkpointing_steps", "2",
                                          "--validation_prompts", "a red circle", "--num_validation_images", "1",
                                          "--validation_steps", "2", *flags))
    assert result.returncode == 0, result.stderr[-3000:]
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2] and all(0 <= m["reward"] <= 1 for m in logged)
    assert logged[1]["kl_penalty"] > 0
    assert json.loads((out / "validation_reward.json").read_text())["step"] == 2

    pipe = pipeline_class.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle", height=48, width=32, num_inference_steps=3, max_sequence_length=32,
                  output_type="pt")
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(out)
    config = next(iter(pipe.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8)
    assert (pipe(generator=torch.Generator().manual_seed(0), **kwargs).images - before).abs().max() > 1e-4

    plain, comfy = load_file(out / LORA_WEIGHTS_NAME), load_file(out / COMFYUI_WEIGHTS_NAME)
    modules = {k.removesuffix(".lora_A.weight") for k in plain if k.endswith(".lora_A.weight")}
    assert any(".single_transformer_blocks.0.attn.to_out" in m for m in modules)
    assert {k.removesuffix(".alpha") for k in comfy if k.endswith(".alpha")} == modules
    assert all(float(v) == 8.0 for k, v in comfy.items() if k.endswith(".alpha"))
    assert pipeline_class.__name__ in (out / "README.md").read_text()

    evaluation = ev.evaluate(str(model), ["a red circle"], reward="redness", loras=[out], lora_scales=[0],
                             aig=["linear"], num_inference_steps=3, height=48, width=32, seeds_per_prompt=2,
                             diversity_metric="pixel_l2", device="cpu")
    rows = {r["model"]: r["reward_mean"] for r in evaluation.rows}
    assert rows[f"{out.name}@scale=0"] == pytest.approx(rows["base"], abs=1e-6)
    assert abs(rows[out.name] - rows["base"]) > 1e-6


# ------------------------------------------------------------- --compile and AIG


@pytest.mark.slow
def test_compile_gives_the_eager_klein_rollout_and_compiles_nothing_after_warm_up(tiny_flux2_klein_path):
    """[klein] base's two passes per step (prompt, then negative prompt) through the compiled no-grad wrapper
    (`aot_eager`): the eager rewards, penalty and gradients; two graphs (adapters on and off), none later."""
    from test_flow_downstream import loss_and_grads

    from utils.rollout.compile import compile_no_grad_denoiser, compiled_graph_count, no_new_graphs

    family = load(tiny_flux2_klein_path)
    add_random_lora(family, preset="attention")
    eager = models_of(family)
    no_grad_denoiser = compile_no_grad_denoiser(family.denoiser, family.vae, backend="aot_eager")
    compiled = Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                      scheduler=eager.scheduler, no_grad_denoiser=no_grad_denoiser)
    noise = noise_for(family)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=3.0)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            before = compiled_graph_count()
            r_c, p_c, g_c = loss_and_grads(compiled, PROMPTS, noise, config, NEGATIVE)
            assert compiled_graph_count() - before == 2  # one per adapter state
            r_e, p_e, g_e = loss_and_grads(eager, PROMPTS, noise, config, NEGATIVE)
            torch.testing.assert_close(r_c, r_e, rtol=0, atol=1e-5)
            torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=0)
            assert p_e > 0 and ((g_c - g_e).norm() / g_e.norm()).item() < 1e-4
            with no_new_graphs("FLUX.2 training samples after warm-up"):
                other = RolloutConfig(num_inference_steps=4, guidance_scale=3.0, truncation_steps=2)
                loss_and_grads(compiled, PROMPTS, torch.randn_like(noise), other, NEGATIVE)
    finally:
        no_grad_denoiser.close()


@pytest.mark.slow
def test_aig_base_and_lora_schedules_reproduce_the_klein_pipeline_exactly(tiny_flux2_klein_path, tmp_path):
    """AIG's weight is found from the pipeline's current step (its transformer sees t / 1000), for both of a
    guided step's calls: `base` and `lora` are the plain pipelines, bit for bit; `linear` lies between."""
    from lora_fixtures import save_random_lora

    from utils.evaluation.aig import annealed_guidance, schedule_weights

    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_klein_path)
    pipe.set_progress_bar_config(disable=True)

    def images():
        with torch.no_grad():
            return pipe(prompt=PROMPTS, height=48, width=32, num_inference_steps=3, guidance_scale=3.0,
                        max_sequence_length=32, generator=[torch.Generator().manual_seed(k) for k in range(2)],
                        output_type="pt").images

    base = images()
    pipe.load_lora_weights(str(save_random_lora(tiny_flux2_klein_path, tmp_path / "lora", rank=4, alpha=8,
                                                strength=8.0)))
    lora = images()
    assert (lora - base).abs().max() > 1e-3  # the LoRA matters, so the checks below can fail
    with annealed_guidance(pipe, "base") as aig:
        assert torch.equal(images(), base)
    assert aig.weights_used == [(i, 3, 0.0) for i in range(3) for _ in range(2)]  # prompt and negative passes
    with annealed_guidance(pipe, "lora"):
        assert torch.equal(images(), lora)
    with annealed_guidance(pipe, "linear") as aig:
        middle = images()
    assert [w for _, _, w in aig.weights_used][::2] == schedule_weights("linear", 3)
    gap = (lora - base).abs().mean()
    assert 0.01 * gap < (middle - base).abs().mean() < gap


# ------------------------------------------------------------- multi-process and resume


@pytest.mark.slow
def test_two_process_gloo_run_with_compile_trains_klein(tiny_flux2_klein_path, tmp_path):
    """Real DDP over gloo, the no-grad transformer calls compiled (`aot_eager`), [klein] base's guided two passes
    per step: each rank its own prompts, both ranks end with the same LoRA."""
    import os
    import subprocess
    import sys

    from test_flow_train import ROOT, SCRIPT, base_args, metrics

    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "DRAFTPLUS_COMPILE_BACKEND": "aot_eager"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             "29537", SCRIPT, *base_args(tiny_flux2_klein_path, out, "--max_train_steps", "2",
                                                         "--checkpointing_steps", "2", "--compile", "--guidance_scale",
                                                         "3", "--max_sequence_length", "32")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Num processes: 2" in result.stderr and [m["step"] for m in metrics(out)] == [1, 2]
    assert all(abs(m["reward_by_process"][0] - m["reward_by_process"][1]) > 1e-6 for m in metrics(out))
    digests = {line.split("LoRA weights digest ")[1].split()[0] for line in result.stderr.splitlines()
               if "LoRA weights digest" in line}
    assert len(digests) == 1  # logged by both ranks, equal


@pytest.mark.slow
def test_a_resumed_flux2_run_ends_where_an_uninterrupted_one_does(tiny_flux2_dev_path, tmp_path):
    from safetensors.torch import load_file
    from test_flow_train import accelerate_launch, base_args, metrics

    def run(out, *extra):
        result = accelerate_launch(*base_args(tiny_flux2_dev_path, out, "--max_train_steps", "3",
                                              "--checkpointing_steps", "1", "--max_sequence_length", str(SEQ), *extra))
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                                   (straight / "metrics.jsonl").read_text().splitlines()[:2]))
    second = run(resumed, "--resume_from_checkpoint", "latest")
    assert "checkpoint-2" in second.stdout + second.stderr
    assert [m["step"] for m in metrics(resumed)] == [1, 2, 3]
    assert metrics(resumed)[2]["reward"] == pytest.approx(metrics(straight)[2]["reward"], rel=1e-5)
    lora, lora_resumed = (load_file(d / "pytorch_lora_weights.safetensors") for d in (straight, resumed))
    assert lora.keys() == lora_resumed.keys()
    for key in lora:
        torch.testing.assert_close(lora_resumed[key], lora[key], rtol=1e-4, atol=1e-6)
