"""--precompute_prompt_embeddings: for every family, the cached conditioning gives the images and LoRA gradient of
encoding each step (a batch of one bit for bit, of two to float rounding: SDXL, SD3 and Qwen-Image's encoders round
a batch of two otherwise than two of one), in a pipeline loaded without its text encoders (as a resume loads it),
whose validation gets its recorded encodings; a run, its resume, a mismatched cache, two sharded processes; the
model card; and the estimator shows the option's effect."""

import contextlib
import sys
from types import SimpleNamespace

import pytest
import torch

from rewards import build_reward
from tests.test_fsdp import fsdp_launch, fsdp_run  # noqa: F401 (a fixture: the same sharded run, encoding each step)
from tests.test_fsdp import metrics as fsdp_metrics
from utils.families import load_family, read_model_index
from utils.families.text_encoders import release_text_encoders, text_encoder_components
from utils.lora import add_lora
from utils.rollout.loop import Models, RolloutConfig, draftplus_step
from utils.run import prompt_cache

PROMPTS = ["a red square", "a much longer prompt: a small blue circle on a wide green field at noon"]
# fixture, family options, guidance scale, negative prompt, image height and width
CASES = {
    "sd": ("tiny_sd_path", {}, 7.5, "blurry", 32, 32),
    "sdxl": ("tiny_sdxl_path", {}, 7.5, "", 32, 32),
    "sd3": ("tiny_sd3_path", {}, 7.0, "blurry", 48, 32),
    "flux-dev": ("tiny_flux_dev_path", {"true_cfg_scale": 2.0}, 3.5, "blurry", 32, 32),
    "flux2-dev": ("tiny_flux2_dev_path", {}, 4.0, "", 48, 32),
    "flux2-klein": ("tiny_flux2_klein_path", {}, 4.0, "blurry", 48, 32),
    "qwen-image": ("tiny_qwen_image_path", {"true_cfg_scale": 4.0}, 0.0, "blurry", 48, 32),
    "z-image": ("tiny_z_image_path", {}, 5.0, "blurry", 48, 32),
}


def one_step(family, lora_params, prompts, config, negative_prompt, size, prompt_embeddings=None):
    models = Models(family=family, denoiser=family.denoiser, raw_denoiser=family.denoiser, vae=family.vae,
                    scheduler=family.pipe.scheduler, prompt_embeddings=prompt_embeddings)
    noise = torch.randn(family.latent_shape(len(prompts), *size), generator=torch.Generator().manual_seed(0))
    images = []

    def reward(x, prompts):
        images.append(x.detach().clone())
        return build_reward("redness")(x, prompts)

    loss, _, _ = draftplus_step(models, reward, prompts, noise, config, 0.1, negative_prompt)
    loss.backward()
    grads = [p.grad.clone() for p in lora_params]
    for p in lora_params:
        p.grad = None
    return images[0], grads


def assert_same(a, b, exact):
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(a, b, **tolerance)


# SD1.5 in the fast lane; every family in the slow one (3-6 s each).
@pytest.mark.parametrize("case", [case if case == "sd" else pytest.param(case, marks=pytest.mark.slow) for case in CASES])
def test_cached_conditioning_gives_the_same_images_gradient_and_validation_latents(case, request, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(prompt_cache, "SHARD_BYTES", 1)  # a shard per prompt: reading across shards
    fixture, options, guidance_scale, negative_prompt, height, width = CASES[case]
    family = load_family(str(request.getfixturevalue(fixture)), **options)
    for module in (*family.text_encoders, family.denoiser, family.vae):
        module.requires_grad_(False).eval()
    lora_params = add_lora(family.denoiser, rank=4)
    for p in lora_params:  # lora_B away from its zero init, so the LoRA changes the images
        torch.nn.init.normal_(p, std=0.05)
    config = RolloutConfig(num_inference_steps=2, guidance_scale=guidance_scale)
    args = SimpleNamespace(negative_prompt=negative_prompt, height=height, width=width, guidance_scale=guidance_scale,
                           validation_prompts=["a red square"], num_validation_images=2, seed=0,
                           num_inference_steps=2, eta=0.0)

    def validation_latents(family):
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return prompt_cache.sample_validation_latents(family, args, "a red square", generators)

    encoded = {n: one_step(family, lora_params, PROMPTS[:n], config, negative_prompt, (height, width))
               for n in (1, 2)}
    validation = validation_latents(family)

    cache = prompt_cache.PromptEmbeddingCache(str(tmp_path), {"case": case})
    cache.write(family, args, PROMPTS, config.guided, torch.device("cpu"), contextlib.nullcontext)
    assert cache.ready() and cache.path == tmp_path / prompt_cache.CACHE_DIR / prompt_cache.INDEX_NAME
    assert sorted(p.name for p in cache.dir.iterdir()) == [prompt_cache.SHARD_NAME.format(0),
                                                           prompt_cache.SHARD_NAME.format(1), prompt_cache.INDEX_NAME]
    released = release_text_encoders(family, torch.device("cpu"))
    assert released and not family.text_encoders
    assert all(getattr(family.pipe, name) is None for name in released)

    # As a resume with this cache: the pipeline loaded without its text encoders, the same LoRA.
    path = request.getfixturevalue(fixture)
    fresh = load_family(str(path), components=text_encoder_components(read_model_index(str(path))), **options)
    assert not fresh.text_encoders and release_text_encoders(fresh, torch.device("cpu")) == []
    fresh.denoiser.requires_grad_(False).eval()
    fresh_lora = add_lora(fresh.denoiser, rank=4)
    with torch.no_grad():
        for p, q in zip(fresh_lora, lora_params, strict=True):
            p.copy_(q)
    assert prompt_cache.replay_prompt_encodings(fresh.pipe, cache.path) >= 1
    embeddings = cache.embeddings(PROMPTS, args, config.guided, torch.device("cpu"))

    for n, exact in ((1, True), (2, False)):
        images, grads = one_step(fresh, fresh_lora, PROMPTS[:n], config, negative_prompt, (height, width),
                                 embeddings)
        assert_same(images, encoded[n][0], exact)
        for g, h in zip(grads, encoded[n][1], strict=True):
            assert_same(g, h, exact)
    assert any(g.abs().sum() > 0 for g in encoded[1][1])
    assert_same(validation_latents(fresh), validation, exact=True)  # from the recorded encodings, no encoder
    with pytest.raises(RuntimeError, match="not encoded ahead"):  # a prompt no one encoded: said, not guessed
        prompt_cache.sample_validation_latents(fresh, args, "a blue square", [torch.Generator().manual_seed(0)])
    with pytest.raises(ValueError, match="encoded for"):  # another setting than the cached one is never served
        embeddings(PROMPTS[:1], negative_prompt + "x", config.guided, height=height, width=width)


def test_overwrite_output_dir_removes_the_cache(tmp_path):
    from utils.run.output_dir import clear_previous_run, previous_run_files

    (tmp_path / prompt_cache.CACHE_DIR).mkdir()
    (tmp_path / prompt_cache.CACHE_DIR / prompt_cache.INDEX_NAME).write_bytes(b"x")
    assert previous_run_files(tmp_path) == [prompt_cache.CACHE_DIR]
    clear_previous_run(tmp_path, "logs")
    assert not (tmp_path / prompt_cache.CACHE_DIR).exists()


@pytest.mark.slow  # four training runs
def test_a_run_encodes_once_frees_the_encoders_and_a_resume_reads_the_cache(tiny_sd_path, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tests.test_train import SCRIPT, base_args, metrics, run

    def train(out, *extra):
        result = run([sys.executable, SCRIPT, *base_args(tiny_sd_path, out, "--checkpointing_steps", "1",
                                                         "--validation_prompts", "a cat", "--num_validation_images",
                                                         "2", *extra)])
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr

    def stored(path):
        with safe_open(str(path), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}

    plain, out = tmp_path / "plain", tmp_path / "cached"
    train(plain, "--max_train_steps", "2")
    log = train(out, "--max_train_steps", "2", "--precompute_prompt_embeddings")
    cache = out / prompt_cache.CACHE_DIR / prompt_cache.INDEX_NAME
    assert "Encoded 45 training prompts and validation's 1 encode_prompt call(s)" in log  # the animals; "a cat"
    assert "text encoders text_encoder;" in log
    # batch 1: the same images, so the same rewards, bit for bit
    assert [m["reward"] for m in metrics(out)] == [m["reward"] for m in metrics(plain)]
    assert (out / "validation_before_after.png").is_file()
    metadata, tensors = stored(cache)
    assert json.loads(metadata["fingerprint"])["prompt_count"] == 45 and len(json.loads(metadata["train"])) == 45

    mtime = cache.stat().st_mtime_ns
    log = train(out, "--max_train_steps", "3", "--precompute_prompt_embeddings", "--resume_from_checkpoint", "latest")
    assert "text encoders not loaded" in log and "Encoded" not in log
    assert cache.stat().st_mtime_ns == mtime

    # Another fingerprint on disk (as if encoded for another size): not used, encoded anew.
    fingerprint = json.loads(metadata["fingerprint"])
    save_file(tensors, str(cache), {**metadata, "fingerprint": json.dumps({**fingerprint, "height": 64})})
    log = train(out, "--max_train_steps", "4", "--precompute_prompt_embeddings", "--resume_from_checkpoint", "latest")
    assert "encoded with other settings (height): encoding anew" in log and "Encoded 45 training prompts" in log
    assert json.loads(stored(cache)[0]["fingerprint"]) == fingerprint
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]


@pytest.mark.slow  # traces the model three times: tens of seconds
def test_the_estimate_encodes_apart_and_holds_no_text_encoder(tiny_flux_dev_path):
    import train_draftplus
    from utils.memory import estimate_memory, render
    from utils.memory.step import CACHED_PROMPTS, PROMPTS

    def estimate(*extra):
        args = train_draftplus.parse_args(["--pretrained_model_name_or_path", str(tiny_flux_dev_path), "--reward",
                                           "redness", "--resolution", "32", "--num_inference_steps", "3",
                                           "--estimate_memory", "--report_to", "none", *extra])
        return estimate_memory(args, args.checked)

    plain, on_gpu, on_cpu = estimate(), estimate("--precompute_prompt_embeddings"), estimate(
        "--precompute_prompt_embeddings", "cpu")
    encoders = {k: v for k, v in plain.held().items() if k.startswith("weights: text_encoder")}
    assert len(encoders) == 2 and all(v > 0 for v in encoders.values())
    for cached in (on_gpu, on_cpu):
        held = cached.held()
        assert not any(k.startswith("weights: text_encoder") for k in held)  # not on the GPU during the step
        assert held[CACHED_PROMPTS] > 0
        # the step's peak: the plain one without the text encoders' weights (and their activations)
        assert cached.peak.total <= plain.peak.total - sum(encoders.values())
    # accelerator: the encoding alone, the largest encoder and its activations, counted in the overall peak
    assert max(encoders.values()) < on_gpu.floor < sum(encoders.values()) + plain.phase_peaks[PROMPTS]
    assert on_gpu.phase_peaks[PROMPTS] == on_gpu.floor and on_gpu.total == max(on_gpu.peak.total, on_gpu.floor)
    assert on_cpu.floor == 0 and on_cpu.total == on_cpu.peak.total  # the CPU: nothing on the GPU
    assert on_cpu.peak.total == on_gpu.peak.total
    assert "prompt encoding" in render(on_cpu) and "--precompute_prompt_embeddings cpu" in render(on_cpu)


@pytest.mark.slow  # two processes, twice
def test_two_sharded_processes_encode_on_the_main_one_and_train_as_without_the_option(request, tiny_flux_dev_path):
    """Under --shard (FSDP2, gloo): rank 0 encodes and writes, rank 1 loads no text encoder and reads the cache; the
    largest text encoder, gone, is not sharded; the losses are those of the same run encoding each step."""
    root, _ = request.getfixturevalue("fsdp_run")
    out = root / "cached"
    result = fsdp_launch(tiny_flux_dev_path, out, root / "reward.py", 29597, "--precompute_prompt_embeddings")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "[RANK 0] Prompt embeddings from" in log and "text encoders text_encoder, text_encoder_2;" in log
    assert "[RANK 1] Prompt embeddings from" in log and "text encoders not loaded;" in log
    assert log.count("Encoded 45 training prompts") == 1 and "FSDP2-wrapped" in log
    assert (out / prompt_cache.CACHE_DIR / prompt_cache.INDEX_NAME).is_file()
    straight = fsdp_metrics(root / "straight")
    assert [m["step"] for m in fsdp_metrics(out)] == [m["step"] for m in straight]
    for a, b in zip(fsdp_metrics(out), straight, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["reward_by_process"] == pytest.approx(b["reward_by_process"], rel=1e-5)


def test_the_model_card_says_where_the_prompts_were_encoded(tmp_path):
    from tests.test_model_card import make_args, parse
    from utils.run.model_card import model_card_text

    for extra, said in (((), None), (("--precompute_prompt_embeddings",), "on the GPU"),
                        (("--precompute_prompt_embeddings", "cpu"), "on the CPU")):
        text = parse(model_card_text(make_args("toy", tmp_path / "out", *extra), "StableDiffusionPipeline", None)).text
        row = [line for line in text.splitlines() if line.startswith("| prompt embeddings |")]
        assert row == ([] if said is None else [f"| prompt embeddings | encoded once before training, {said} "
                                                 f"(`--precompute_prompt_embeddings {' '.join(extra[1:]) or 'accelerator'}`) |"])
