"""Everything downstream of training on the flow-matching families (SD3/SD3.5, FLUX.1): live validation renders
the rollout's images, the evaluator's rows (base, LoRA, LoRA scale, AIG, mixes) are the diffusers pipelines'
images, AIG's `base` and `lora` schedules reproduce the plain pipelines exactly, `--compile` gives the eager
rollout, and the model card names the base model, its license and the file ComfyUI loads."""

from types import SimpleNamespace

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from lora_fixtures import save_random_lora
from test_validation import FakeAccelerator

from rewards import build_reward
from utils.families import load_family
from utils.lora import adapters_disabled, add_lora
from utils.rollout.loop import Models, RolloutConfig, rollout

SEQ = 16
HEIGHT, WIDTH = 48, 32  # non-square; latents 24x16 with the tiny VAE (factor 2)
FAMILIES = ["tiny_flux_dev_path", "tiny_sd3_path", "tiny_qwen_image_path"]
# Guidance as each family takes it: FLUX.1-dev's distilled guidance; SD3's CFG with a negative prompt; Qwen-Image's
# pipeline default call (no negative prompt: no true CFG; its true CFG is tests/test_family_qwen_image.py's).
GUIDANCE = {"tiny_flux_dev_path": (3.5, ""), "tiny_sd3_path": (4.0, "a blue square"), "tiny_qwen_image_path": (0.0, "")}


def trained_family(path, seed=1, std=0.1):
    """The family of a tiny pipeline with a LoRA on its transformer whose B is random (it changes the images)."""
    family = load_family(str(path), max_sequence_length=SEQ)
    add_lora(family.denoiser, rank=4, lora_alpha=8, target_modules=family.target_modules(["attention"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in family.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return family


def models_of(family):
    scheduler = family.pipe.scheduler.__class__.from_config(family.pipe.scheduler.config)
    return Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                  scheduler=scheduler)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fixture", FAMILIES)
def test_validation_renders_the_rollouts_images_from_the_rollouts_noise(fixture, request, tmp_path):
    """The family's pipeline (FLUX: packed latents in, packed latents out) renders each validation image from the
    noise the rollout draws for its seed; with `--final_latent sample` the rollout's images are the same, for the
    LoRA and for the base (adapters off)."""
    guidance, negative = GUIDANCE[fixture]
    family = trained_family(request.getfixturevalue(fixture))
    models = models_of(family)
    args = SimpleNamespace(validation_prompts=["a red circle"], num_validation_images=2, seed=3,
                           negative_prompt=negative, num_inference_steps=3, guidance_scale=guidance, eta=0.0,
                           height=HEIGHT, width=WIDTH, output_dir=str(tmp_path / "run"), validation_diversity=None)
    from utils.run.validation import Validation

    validation = Validation(args, FakeAccelerator(), models, build_reward("redness"))
    base, lora = validation.render_base(), validation(1)
    assert lora.images.shape == (2, 3, HEIGHT, WIDTH)
    assert (lora.images - base.images).abs().max() > 1e-3  # the LoRA matters
    assert (tmp_path / "run" / "validation" / "step-1.png").is_file()

    noise = randn_tensor(family.latent_shape(2, HEIGHT, WIDTH), generator=[torch.Generator().manual_seed(3 + k)
                                                                            for k in range(2)])
    cond = family.encode_prompts(["a red circle"] * 2, negative, guidance > 1, height=HEIGHT, width=WIDTH)
    config = RolloutConfig(num_inference_steps=3, guidance_scale=guidance, final_latent="sample")
    with torch.no_grad():
        lora_rollout = rollout(models, cond, noise, config, with_reference=False).images
        with adapters_disabled(family.denoiser):
            base_rollout = rollout(models, cond, noise, config, with_reference=False).images
    # (the pipeline encodes the prompt once and repeats it, the rollout encodes it per image: rounding apart)
    torch.testing.assert_close(lora.images, lora_rollout, rtol=0, atol=1e-5)
    torch.testing.assert_close(base.images, base_rollout, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- evaluator

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def flow_loras(request, tmp_path_factory):
    """Per family: a random LoRA (it changes the images) and a zero one (B = 0: exactly the base model)."""
    root = tmp_path_factory.mktemp("flow-loras")
    return {fixture: {"random": save_random_lora(path, root / fixture / "random", rank=4, alpha=8, strength=8.0),
                      "zero": save_random_lora(path, root / fixture / "zero", zero=True)}
            for fixture, path in ((fixture, request.getfixturevalue(fixture)) for fixture in FAMILIES)}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", FAMILIES)
def test_the_evaluators_rows_are_the_pipelines_images_and_the_controls_mean_what_they_say(fixture, request,
                                                                                         flow_loras):
    """base and LoRA rows: the rewards of the family's pipeline's own images (plain, and with
    `load_lora_weights`); LoRA scale 0, AIG `base`/`lora` and mixes agree with what they mean."""
    from utils.evaluation import evaluate as ev

    path, loras = request.getfixturevalue(fixture), flow_loras[fixture]
    guidance, negative = GUIDANCE[fixture]
    settings = {"num_inference_steps": 3, "guidance_scale": guidance, "negative_prompt": negative or None,
                "height": HEIGHT, "width": WIDTH, "seeds_per_prompt": 2}
    result = ev.evaluate(str(path), PROMPTS, reward="redness", loras=[loras["random"], loras["zero"]],
                         lora_scales=[0, 0.5], aig=["base", "lora", "linear"],
                         mixes=[["random=0.5"], {"random": 1.0, "zero": 1.0}], diversity_metric="pixel_l2",
                         device="cpu", **settings)
    by_label = {r["model"]: r for r in result.rows}

    def same(a, b):
        return by_label[a]["reward_mean"] == pytest.approx(by_label[b]["reward_mean"], abs=1e-6) and \
            by_label[a]["diversity"] == pytest.approx(by_label[b]["diversity"], abs=1e-6)

    assert abs(by_label["random"]["reward_mean"] - by_label["base"]["reward_mean"]) > 1e-4  # the LoRA matters
    assert same("zero", "base") and same("random@scale=0", "base")
    assert same("random@aig=base", "base") and same("random@aig=lora", "random")
    assert same("mix(random=0.5)", "random@scale=0.5") and same("mix(random=1,zero=1)", "random")
    for middle in ("random@scale=0.5", "random@aig=linear"):
        assert not same(middle, "base") and not same(middle, "random")

    # The rows are the pipeline's images: the base model's, and with the LoRA loaded as a user loads it.
    family = load_family(str(path))
    pipe = family.pipe
    pairs = [(i, j) for i in range(len(PROMPTS)) for j in range(2)]
    redness = build_reward("redness")

    def rewards(label):
        return [r["reward"] for r in result.per_image if r["model"] == label]

    def pipeline_rewards():
        images = ev.generate(pipe, PROMPTS, pairs, 0, 3, guidance, HEIGHT, WIDTH,
                             negative_kwargs=family.negative_prompt_kwargs(negative, len(pairs)), pipeline_kwargs={"max_sequence_length": pipe_sequence_length(fixture)})
        return redness(images, [PROMPTS[i] for i, _ in pairs]).tolist()

    assert rewards("base") == pytest.approx(pipeline_rewards(), abs=1e-6)
    pipe.load_lora_weights(str(loras["random"]))
    assert rewards("random") == pytest.approx(pipeline_rewards(), abs=1e-6)


def pipe_sequence_length(fixture):
    """The T5 length the evaluator gives the pipeline: the trainer's default for the family."""
    return 256 if fixture == "tiny_sd3_path" else 512


@pytest.mark.parametrize("fixture, expected", [
    ("tiny_sd_path", {"scheduler": "ddim", "num_inference_steps": 20, "guidance_scale": 7.5, "family_options": {}}),
    ("tiny_sd3_path", {"scheduler": "model", "num_inference_steps": 28, "guidance_scale": 7.0,
                       "family_options": {"max_sequence_length": 256}}),
    ("tiny_flux_dev_path", {"scheduler": "model", "num_inference_steps": 28, "guidance_scale": 3.5,
                            "family_options": {"max_sequence_length": 512, "true_cfg_scale": 1.0}}),
    ("tiny_flux_schnell_path", {"scheduler": "model", "num_inference_steps": 4, "guidance_scale": 0.0,
                                "family_options": {"max_sequence_length": 256, "true_cfg_scale": 1.0}}),
    ("tiny_qwen_image_path", {"scheduler": "model", "num_inference_steps": 50, "guidance_scale": 0.0,
                              "family_options": {"max_sequence_length": 512, "true_cfg_scale": 4.0}}),
])
def test_the_evaluators_sampler_defaults_are_the_familys(fixture, expected, request):
    """The trainer's defaults for the family's own options too: FLUX.1-schnell's 256 T5 tokens, not FLUX's 512."""
    from utils.evaluation.evaluate import family_of_model, with_family_defaults

    model = str(request.getfixturevalue(fixture))
    family = family_of_model(model)
    assert with_family_defaults(family, model, {"scheduler": None, "seed": 1}) == {**expected, "seed": 1}
    given = {"scheduler": "model", "num_inference_steps": 3, "guidance_scale": 2.0}
    options = {name: 7 for name in expected["family_options"]}
    assert with_family_defaults(family, model, {**given, **options}) == {**given, "family_options": options}


@pytest.mark.parametrize("extra, expected", [
    (["--scheduler", "ddim"], "--scheduler ddim: FluxPipeline models sample with FlowMatchEulerDiscreteScheduler; "
                              "use --scheduler model"),
    (["--eta", "0.5"], "--eta 0.5: FluxPipeline takes no eta"),
    (["--negative_prompt", "a blue square"], "--negative_prompt acts on FLUX only with --true_cfg_scale > 1"),
    (["--height", "40"], "--height must be a multiple of 16 for FluxPipeline models, got 40"),
])
def test_samplers_a_flow_pipeline_cannot_take_are_one_line_before_any_model_loads(tiny_flux_dev_path, tmp_path,
                                                                                  capsys, extra, expected):
    from utils.evaluation import cli

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--pretrained_model_name_or_path", str(tiny_flux_dev_path), "--prompts", "animals",
                 "--diversity_metric", "pixel_l2", "--output_dir", str(out), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- AIG


def pipeline_images(pipe, fixture, steps=3, **kwargs):
    guidance, negative = GUIDANCE[fixture]
    with torch.no_grad():
        return pipe(PROMPTS, negative_prompt=[negative] * 2 if negative else None, height=HEIGHT, width=WIDTH,
                    num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=SEQ,
                    generator=[torch.Generator().manual_seed(k) for k in range(2)], output_type="pt",
                    **kwargs).images


@pytest.mark.slow
@pytest.mark.parametrize("fixture", FAMILIES)
def test_aig_base_and_lora_schedules_reproduce_the_flow_pipelines_exactly(fixture, request, flow_loras):
    from utils.evaluation.aig import annealed_guidance, schedule_weights

    pipe = load_family(str(request.getfixturevalue(fixture))).pipe
    base = pipeline_images(pipe, fixture)
    pipe.load_lora_weights(str(flow_loras[fixture]["random"]))
    lora = pipeline_images(pipe, fixture)
    assert (lora - base).abs().max() > 1e-3  # the LoRA matters, so the checks below can fail

    with annealed_guidance(pipe, "base") as aig:
        assert torch.equal(pipeline_images(pipe, fixture), base)
    assert aig.weights_used == [(i, 3, 0.0) for i in range(3)]  # one transformer call per step (SD3: CFG batched)
    with annealed_guidance(pipe, "lora"):
        assert torch.equal(pipeline_images(pipe, fixture), lora)
    with annealed_guidance(pipe, "linear") as aig:
        middle = pipeline_images(pipe, fixture)
    assert [w for _, _, w in aig.weights_used] == schedule_weights("linear", 3)
    gap = (lora - base).abs().mean()
    assert 0.01 * gap < (middle - base).abs().mean() < gap and 0.01 * gap < (middle - lora).abs().mean() < gap
    assert torch.equal(pipeline_images(pipe, fixture), lora)  # leaving the context restores the LoRA pipeline
    assert "forward" not in pipe.transformer.__dict__


def test_aig_mixes_the_flux_transformers_velocities_at_the_calls_step(tiny_flux_dev_path, flow_loras):
    """Called as FluxPipeline calls it (the timestep / 1000), outside a pipeline call: step 2 of 5 is found, and
    the output is (1 - w) v_base + w v_lora."""
    from diffusers import FluxPipeline

    from utils.evaluation.aig import annealed_guidance

    pipe = FluxPipeline.from_pretrained(tiny_flux_dev_path)
    pipe.load_lora_weights(str(flow_loras["tiny_flux_dev_path"]["random"]))
    pipe.scheduler.set_timesteps(5, mu=0.5)
    t = pipe.scheduler.timesteps[2]
    generator = torch.Generator().manual_seed(0)
    kwargs = {"hidden_states": torch.randn(1, 12, 64, generator=generator), "timestep": (t / 1000).reshape(1),
              "guidance": torch.tensor([3.5]), "pooled_projections": torch.randn(1, 32, generator=generator),
              "encoder_hidden_states": torch.randn(1, 7, 32, generator=generator), "txt_ids": torch.zeros(7, 3),
              "img_ids": FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32),
              "return_dict": False}
    with torch.no_grad():
        lora = pipe.transformer(**kwargs)[0]
        pipe.disable_lora()
        base = pipe.transformer(**kwargs)[0]
        pipe.enable_lora()
        with annealed_guidance(pipe, lambda i, n: 0.3 + 0.1 * i / n) as aig:
            mixed = pipe.transformer(**kwargs)[0]
    w = 0.3 + 0.1 * 2 / 5
    assert aig.weights_used == [(2, 5, pytest.approx(w))]
    torch.testing.assert_close(mixed, (1 - w) * base + w * lora, rtol=0, atol=1e-6)
    assert (lora - base).abs().max() > 1e-3


def test_aig_finds_every_step_of_a_bf16_flux_pipeline(tiny_flux_dev_path, flow_loras):
    """In bf16 FluxPipeline hands its transformer t / 1000 rounded to bf16, where neighbouring steps of a
    28-step schedule can meet; the step is read from the pipeline's own `current_timestep`."""
    from diffusers import FluxPipeline

    from utils.evaluation.aig import annealed_guidance, schedule_weights

    pipe = FluxPipeline.from_pretrained(tiny_flux_dev_path, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(flow_loras["tiny_flux_dev_path"]["random"]))
    with annealed_guidance(pipe, "power_2") as aig:
        pipe("a red circle", height=HEIGHT, width=WIDTH, num_inference_steps=28, max_sequence_length=SEQ,
             output_type="latent")
    assert aig.weights_used == [(i, 28, w) for i, w in enumerate(schedule_weights("power_2", 28))]


# ---------------------------------------------------------------------------------------------- --compile


def loss_and_grads(models, prompts, noise, config, negative):
    from utils.rollout.loop import draftplus_step

    loss, rewards, penalty = draftplus_step(models, build_reward("redness"), prompts, noise, config, kl_coeff=1.0,
                                            negative_prompt=negative)
    loss.backward()
    params = [p for p in models.raw_denoiser.parameters() if p.requires_grad]
    grads = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return rewards, penalty, grads


@pytest.mark.slow
@pytest.mark.parametrize("fixture", FAMILIES)
def test_compile_gives_the_eager_flow_rollout_and_compiles_nothing_after_warm_up(fixture, request):
    """The transformer's no-grad calls (prefix and adapters-off reference) through torch.compile (`aot_eager`, as
    tests/test_compile.py: dynamo's graphs and guards without inductor's code generation): the eager rewards,
    penalty and LoRA gradients; two graphs (adapters on and off), none for later samples of other T and K."""
    import torch._dynamo

    from utils.rollout.compile import compile_no_grad_denoiser, compiled_graph_count, no_new_graphs

    guidance, negative = GUIDANCE[fixture]
    family = trained_family(request.getfixturevalue(fixture))
    eager = models_of(family)
    no_grad_denoiser = compile_no_grad_denoiser(family.denoiser, family.vae, backend="aot_eager")
    compiled = Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                      scheduler=eager.scheduler, no_grad_denoiser=no_grad_denoiser)
    prompts = ["a red circle", "a dog"]
    noise = torch.randn(family.latent_shape(2, HEIGHT, WIDTH), generator=torch.Generator().manual_seed(0))
    config = RolloutConfig(num_inference_steps=3, guidance_scale=guidance, truncation_steps=1)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            before = compiled_graph_count()
            r_c, p_c, g_c = loss_and_grads(compiled, prompts, noise, config, negative)
            assert compiled_graph_count() - before == 2  # one per adapter state
            r_e, p_e, g_e = loss_and_grads(eager, prompts, noise, config, negative)
            torch.testing.assert_close(r_c, r_e, rtol=0, atol=1e-5)
            torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=0)
            assert p_e > 0 and ((g_c - g_e).norm() / g_e.norm()).item() < 1e-4
            with no_new_graphs("flow training samples after warm-up"):
                other = RolloutConfig(num_inference_steps=4, guidance_scale=guidance, truncation_steps=2)
                loss_and_grads(compiled, prompts, torch.randn_like(noise), other, negative)
    finally:
        no_grad_denoiser.close()


# ---------------------------------------------------------------------------------------------- the run's settings


@pytest.mark.slow
def test_the_evaluator_renders_a_trained_schnell_lora_as_its_runs_validation_did(tiny_flux_schnell_path, tmp_path,
                                                                                 monkeypatch):
    """A FLUX.1-schnell LoRA trained with the family's defaults (4 steps, 256 T5 tokens, no guidance), evaluated with
    no sampler setting given: the evaluator takes the run's recorded settings (and says so), and its images of the
    validation prompts, from the validation's seeds, are the run's own validation images: the same rewards, the
    same pixels. The same evaluation with FLUX's pipeline default of 512 T5 tokens gives other images."""
    import json

    from PIL import Image
    from test_flow_train import accelerate_launch

    from utils.evaluation import evaluate as ev
    from utils.evaluation.run_settings import SETTINGS_NAME
    from utils.run.validation import VALIDATION_LOG, to_pil

    out, prompts, seed = tmp_path / "schnell", ["a red circle", "a blue square"], 3
    result = accelerate_launch("--pretrained_model_name_or_path", str(tiny_flux_schnell_path), "--reward", "redness",
                               "--prompts", "animals", "--height", "48", "--width", "32", "--rank", "4",
                               "--learning_rate", "1e-2", "--max_train_steps", "1", "--seed", str(seed),
                               "--validation_prompts", *prompts, "--num_validation_images", "2",
                               "--output_dir", str(out), "--report_to", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / SETTINGS_NAME).read_text()) == {
        "scheduler": "model", "num_inference_steps": 4, "eta": 0.0, "height": 48, "width": 32,
        "max_sequence_length": 256, "true_cfg_scale": 1.0}
    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        modules = {key.split(".lora_")[0] for key in f.keys()}
    card = (out / "README.md").read_text()
    assert f"targets attention ({len(modules)} transformer modules)" in card
    assert "| resolution | 32x48 (the model's native size is 256x256) |" in card  # FluxPipeline's 128 latents x 2
    assert "--max_sequence_length 256" in card and "--guidance_scale" not in card
    validation = [json.loads(line) for line in (out / VALIDATION_LOG).read_text().splitlines()]
    run_rewards = torch.tensor(next(e for e in validation if e["phase"] == "lora" and e["step"] == 1)["rewards"])

    monkeypatch.setattr(ev, "image_seed", lambda base, prompt_index, seed_index: base + seed_index)  # validation's
    logs = []

    def evaluate(**settings):
        return ev.evaluate(str(tiny_flux_schnell_path), prompts, reward="redness", loras=[out], include_base=False,
                           seeds_per_prompt=2, seed=seed, diversity_metric="pixel_l2", device="cpu", grid_prompts=2,
                           log=logs.append, **settings)

    evaluated = evaluate()
    assert any("sampled as the LoRAs were trained" in line and "max_sequence_length 256" in line for line in logs)
    rewards = torch.tensor([row["reward"] for row in evaluated.per_image])
    torch.testing.assert_close(rewards, run_rewards, rtol=0, atol=1e-5)
    images = evaluated.grids["schnell"]  # prompt-major, as validation renders them
    for k in range(len(prompts)):
        saved = Image.open(out / "validation" / f"prompt-{k}.png")  # the prompt's images side by side, enlarged
        enlarged = [to_pil(im).resize((saved.width // 2, saved.height), Image.NEAREST) for im in images[2 * k:2 * k + 2]]
        row = torch.cat([torch.tensor(list(im.getdata())).float().reshape(saved.height, -1, 3) for im in enlarged], 1)
        assert (row.reshape(-1, 3) - torch.tensor(list(saved.getdata())).float()).abs().max() <= 1  # 8-bit rounding

    at_512 = evaluate(max_sequence_length=512)  # what the evaluator did before it read the run's settings
    assert (at_512.grids["schnell"] - images).abs().max() > 1e-3
    assert (torch.tensor([row["reward"] for row in at_512.per_image]) - run_rewards).abs().max() > 1e-5
