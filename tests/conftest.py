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


def _tiny_pipeline_fixture(name: str, builder: str, doc: str, **kwargs):
    """A session fixture `name`: the path of the tiny random pipeline `utils.toys.tiny_models.<builder>` saves (seed 0);
    `builder` may name another module of utils.toys as `module.function`."""

    def fixture(tmp_path_factory) -> Path:
        # Imported on first use: a test that needs no pipeline loads no diffusers.
        import importlib

        module, _, function = builder.rpartition(".")
        path = tmp_path_factory.mktemp(name)
        getattr(importlib.import_module(f"utils.toys.{module or 'tiny_models'}"), function)(path, seed=0, **kwargs)
        return path

    fixture.__doc__ = doc
    return pytest.fixture(scope="session", name=name)(fixture)


tiny_sd_path = _tiny_pipeline_fixture(
    "tiny_sd_path", "build_random_pipeline", "A tiny random StableDiffusionPipeline (images are 32x32).")
tiny_sd_v_path = _tiny_pipeline_fixture(
    "tiny_sd_v_path", "build_random_pipeline", "The same tiny random SD, v-predicting (as SD 2.x 768-v and the toy).",
    prediction_type="v_prediction")
tiny_sdxl_path = _tiny_pipeline_fixture(
    "tiny_sdxl_path", "build_random_sdxl_pipeline", "A tiny random StableDiffusionXLPipeline (images are 32x32).")
tiny_sd3_path = _tiny_pipeline_fixture(
    "tiny_sd3_path", "build_random_sd3_pipeline",
    "A tiny random StableDiffusion3Pipeline shaped like SD3.5-Medium (VAE factor 2: 48x32 images are 24x16 latents).")
tiny_flux_dev_path = _tiny_pipeline_fixture(
    "tiny_flux_dev_path", "build_random_flux_pipeline",
    "A tiny random FluxPipeline like FLUX.1-dev: a guidance embedding, the dynamic shift.", guidance_embeds=True)
tiny_flux_schnell_path = _tiny_pipeline_fixture(
    "tiny_flux_schnell_path", "build_random_flux_pipeline",
    "A tiny random FluxPipeline like FLUX.1-schnell: no guidance embedding, a fixed shift.", guidance_embeds=False)
tiny_qwen_image_path = _tiny_pipeline_fixture(
    "tiny_qwen_image_path", "tiny_qwen_image.build_random_qwen_image_pipeline",
    "A tiny random QwenImagePipeline (VAE factor 4: 48x32 images are 12x8 latents, 6x4 packed tokens).")
tiny_z_image_path = _tiny_pipeline_fixture(
    "tiny_z_image_path", "tiny_z_image.build_random_z_image_pipeline",
    "A tiny random ZImagePipeline with Z-Image-Turbo's scheduler (VAE factor 2: 48x32 images are 24x16 latents).")
tiny_flux2_dev_path = _tiny_pipeline_fixture(
    "tiny_flux2_dev_path", "tiny_flux2.build_random_flux2_pipeline",
    "A tiny random Flux2Pipeline like FLUX.2 [dev]: Mistral3 text encoder, a guidance embedding (VAE factor 2 x 2x2 "
    "patches: 48x32 images are 12x8 latents).")
tiny_flux2_klein_path = _tiny_pipeline_fixture(
    "tiny_flux2_klein_path", "tiny_flux2.build_random_flux2_klein_pipeline",
    "A tiny random Flux2KleinPipeline like FLUX.2 [klein] base: Qwen3 text encoder, classifier-free guidance.")
