"""Shared fixtures. Every test runs offline on CPU: nothing here may reach a model hub."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    """A tiny random StableDiffusionPipeline saved with save_pretrained (images are 32x32)."""
    from utils.tiny_models import build_random_pipeline

    path = tmp_path_factory.mktemp("tiny-sd")
    build_random_pipeline(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory) -> Path:
    """The same tiny random SD, v-predicting (as SD 2.x 768-v and the toy)."""
    from utils.tiny_models import build_random_pipeline

    path = tmp_path_factory.mktemp("tiny-sd-v")
    build_random_pipeline(path, seed=0, prediction_type="v_prediction")
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> Path:
    """A tiny random StableDiffusionXLPipeline saved with save_pretrained (images are 32x32)."""
    from utils.tiny_models import build_random_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny-sdxl")
    build_random_sdxl_pipeline(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory) -> Path:
    """A tiny random StableDiffusion3Pipeline shaped like SD3.5-Medium (VAE factor 2: 48x32 images are 24x16 latents)."""
    from utils.tiny_models import build_random_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3")
    build_random_sd3_pipeline(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_flux_dev_path(tmp_path_factory) -> Path:
    """A tiny random FluxPipeline like FLUX.1-dev: a guidance embedding, the dynamic shift."""
    from utils.tiny_models import build_random_flux_pipeline

    path = tmp_path_factory.mktemp("tiny-flux-dev")
    build_random_flux_pipeline(path, guidance_embeds=True, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_flux_schnell_path(tmp_path_factory) -> Path:
    """A tiny random FluxPipeline like FLUX.1-schnell: no guidance embedding, a fixed shift."""
    from utils.tiny_models import build_random_flux_pipeline

    path = tmp_path_factory.mktemp("tiny-flux-schnell")
    build_random_flux_pipeline(path, guidance_embeds=False, seed=0)
    return path
