"""The pretrained toy: its data (utils/toys/data.py), its build (utils/toys/pretrain.py), its cache and committed
copy (utils/toys/toy.py); it must follow its captions."""

import json
import os

import pytest
import torch
from diffusers import StableDiffusionPipeline
from toy_checks import assert_same_configs, caption_following, classify_colors, fake_toy_training
from transformers import CLIPTextModel

from utils.toys import data as toy_data
from utils.toys import pretrain as toy_pretrain
from utils.toys import toy
from utils.toys.tiny_models import build_random_pipeline

slow = pytest.mark.skipif(os.environ.get("DRAFTPLUS_SLOW") != "1", reason="rebuilds the toy (~4 min); DRAFTPLUS_SLOW=1")


# ----------------------------------------------------------------------------------------- data


def test_toy_data_is_deterministic_and_the_classifier_is_exact_on_it():
    images, labels = toy_data.sample_toy_dataset(2, torch.Generator().manual_seed(0))
    again, _ = toy_data.sample_toy_dataset(2, torch.Generator().manual_seed(0))
    assert images.shape == (180, 3, 32, 32) and torch.equal(images, again)
    fg, bg = classify_colors(images)
    assert torch.equal(fg, labels[:, 0]) and torch.equal(bg, labels[:, 2])  # calibrates the classifier: 100%


def test_toy_prompts_and_prompts_file():
    prompts = toy_data.toy_prompts()
    assert len(prompts) == 6 * 3 + 6 * 3 * 5 and len(set(prompts)) == len(prompts)
    assert prompts[0] == "a red circle" and "a blue triangle on a yellow background" in prompts
    assert toy_data.toy_prompts(with_background=False) == prompts[:18]
    assert (toy.ASSETS_DIR / "prompts.txt").read_text().splitlines() == prompts


# ----------------------------------------------------------------------------------------- committed toy


def test_committed_toy_is_current_and_small():
    info = toy.read_build_info(toy.ASSETS_DIR)
    assert info is not None, "assets/toy is missing: python -m utils.toys --output_dir assets/toy --force"
    assert info["cache_key"] == toy.toy_cache_key(), (
        "the toy's version (TOY_VERSION) or config changed since assets/toy was built; rebuild it with "
        "`python -m utils.toys --output_dir assets/toy --force` (~4 min) and commit assets/toy")
    assert info["toy_version"] == toy_pretrain.TOY_VERSION
    assert toy.is_current_build(toy.ASSETS_DIR)
    size = sum(f.stat().st_size for f in toy.ASSETS_DIR.rglob("*") if f.is_file())
    assert size < 5 * 2**20
    assert toy.build_toy_pipeline(log=pytest.fail) == toy.ASSETS_DIR  # no rebuild when current


def test_committed_toy_has_the_architecture_the_code_builds(tmp_path):
    """The cache key trusts TOY_VERSION to be bumped when the build changes; this catches a forgotten bump for
    what can be checked in seconds: the tokenizer, the module and scheduler configs, the pipeline's layout."""
    toy_pretrain.untrained_toy_pipeline().save_pretrained(tmp_path)
    assert_same_configs(tmp_path, toy.ASSETS_DIR, extra_files=(toy.BUILD_INFO_FILE,), version_name="TOY_VERSION")


def test_committed_toy_loads_like_a_real_checkpoint():
    pipe = StableDiffusionPipeline.from_pretrained(toy.ASSETS_DIR)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.vae_scale_factor == 4
    # The trainer loads components one by one: fp16 files on disk must still give fp32 modules.
    assert CLIPTextModel.from_pretrained(toy.ASSETS_DIR, subfolder="text_encoder").dtype == torch.float32


def test_toy_vae_keeps_colours():
    pipe = StableDiffusionPipeline.from_pretrained(toy.ASSETS_DIR)
    images, labels = toy_data.sample_toy_dataset(1, torch.Generator().manual_seed(123))
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean
        recon = (pipe.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
    fg, bg = classify_colors(recon)
    assert (recon - images).pow(2).mean().sqrt() < 0.1  # RMSE in [0, 1] units
    assert (fg == labels[:, 0]).float().mean() >= 0.95 and (bg == labels[:, 2]).float().mean() >= 0.95


def test_toy_follows_its_captions():
    """Colour accuracy of samples vs. their captions (chance: 1/6). Measured on the committed toy with
    20 DDIM steps, guidance 5, seeds 0-2: see the README/report; thresholds leave margin for other CPUs."""
    acc = caption_following(toy.ASSETS_DIR, guidance_scale=5.0)
    print(f"caption-following accuracy (guidance 5): {acc}")
    assert acc["fg_full"] >= 0.8 and acc["fg_short"] >= 0.8
    assert acc["bg_full"] >= 0.8


# ----------------------------------------------------------------------------------------- cache logic


def test_cache_key_is_the_toys_version_and_config():
    key = toy.toy_cache_key()
    assert key == toy.toy_cache_key(toy_pretrain.ToyTrainConfig()) and len(key) == 64
    assert toy.toy_cache_key(toy_pretrain.ToyTrainConfig(seed=1)) != key
    assert toy.toy_cache_key(toy_pretrain.ToyTrainConfig(unet_steps=901)) != key


def test_cache_key_follows_the_version_not_the_source_or_torch(monkeypatch):
    key = toy.toy_cache_key()
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # a toy built by another torch stays usable
    assert toy.toy_cache_key() == key
    monkeypatch.setattr(toy_pretrain, "TOY_VERSION", toy_pretrain.TOY_VERSION + 1)
    assert toy.toy_cache_key() != key


def test_build_caches_by_cache_key(tmp_path, monkeypatch):
    """The cache/committed-copy logic, with training replaced by a random pipeline (seconds, not minutes)."""
    calls = fake_toy_training(monkeypatch, tmp_path / "cache", "toy", build_random_pipeline)  # TOY_VERSION 1000
    quiet = {"log": lambda message: None}

    path = toy.build_toy_pipeline(**quiet)
    key = toy.toy_cache_key()
    assert path == tmp_path / "cache" / f"toy-{key[:16]}" and len(calls) == 1
    info = json.loads((path / toy.BUILD_INFO_FILE).read_text())
    assert info["cache_key"] == key and info["toy_version"] == 1000
    assert info["config"]["seed"] == toy_pretrain.TOY_SEED and info["torch"] == torch.__version__
    assert (path / "prompts.txt").read_text().splitlines() == toy_data.toy_prompts()
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no temporary dirs left behind
    from safetensors.torch import load_file

    unet_file = next((path / "unet").glob("*.safetensors"))
    assert {v.dtype for v in load_file(unet_file).values()} == {torch.float16}  # stored fp16 ...
    assert StableDiffusionPipeline.from_pretrained(path).unet.dtype == torch.float32  # ... loaded fp32

    assert toy.build_toy_pipeline(**quiet) == path and len(calls) == 1  # cached
    assert toy.build_toy_pipeline(force=True, **quiet) == path and len(calls) == 2
    other = toy.build_toy_pipeline(config=toy_pretrain.ToyTrainConfig(seed=1), **quiet)
    assert other != path and other.parent == path.parent and len(calls) == 3
    out = tmp_path / "explicit"
    assert toy.build_toy_pipeline(out, **quiet) == out and toy.is_current_build(out)
    assert len(calls) == 4

    monkeypatch.setattr(toy_pretrain, "TOY_VERSION", 1001)  # bumped again: the cache is stale
    assert not toy.is_current_build(path)
    assert toy.build_toy_pipeline(**quiet).name == f"toy-{toy.toy_cache_key()[:16]}" and len(calls) == 5


@slow
@pytest.mark.slow
def test_rebuild_toy_from_scratch(tmp_path):
    """The full build: within the 5-minute budget on 2 cores, and as good as the committed copy."""
    path = toy.build_toy_pipeline(tmp_path / "toy", force=True)
    info = toy.read_build_info(path)
    assert info["cache_key"] == toy.toy_cache_key()
    print(f"toy build: {info['seconds']} s on {info['threads']} threads")
    assert info["seconds"] < 300
    acc = caption_following(path, guidance_scale=5.0)
    print(f"rebuilt toy caption-following accuracy: {acc}")
    assert min(acc.values()) >= 0.8


def test_ci_rebuild_trigger_follows_the_toys_cache_key(monkeypatch):
    """`.ci/run` runs the rebuild test when `python -m utils.toys --check` fails: version, config or torch changed."""
    said = []
    assert toy.committed_toy_is_current(said.append) and said == []
    monkeypatch.setattr(toy_pretrain, "TOY_VERSION", toy_pretrain.TOY_VERSION + 1)
    assert not toy.committed_toy_is_current(said.append) and "training code" in said[-1]
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert not toy.committed_toy_is_current(said.append) and "torch 9.9.9" in said[-1]


def test_check_command_says_current_in_one_line_and_exits_nonzero_when_stale(monkeypatch, capsys):
    toy.main(["--check"])  # returns: exit status 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"assets/toy is current: toy version {toy_pretrain.TOY_VERSION}, "
                      f"cache key {toy.toy_cache_key()[:16]}, torch {torch.__version__}")
    assert len(out) == len(toy.TOYS) and all(line.startswith(f"assets/{name} is current: ")
                                             for line, name in zip(out, toy.TOYS))  # one line per toy
    monkeypatch.setattr(toy_pretrain, "TOY_VERSION", toy_pretrain.TOY_VERSION + 1)
    with pytest.raises(SystemExit) as stale:
        toy.main(["--check"])
    assert stale.value.code == 1 and "training code" in capsys.readouterr().out
