"""Model families: how to load a diffusers pipeline, condition its UNet, and rebuild it for inference.

This is the only module that names diffusers pipeline classes. The trainer, validation, LoRA I/O and
the evaluator ask the family of a model (picked from `model_index.json`'s `_class_name`) for its
components, its prompt conditioning and its pipeline class. Adding a family means adding one class
below and listing it in `FAMILIES`.

Prompt conditioning goes through the pipeline's own `encode_prompt`, so the training rollout sees
exactly the embeddings (and, for SDXL, pooled embeddings and micro-conditioning time ids) that the
diffusers pipeline would compute for the same prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch


class UnsupportedModelError(ValueError):
    """A model whose pipeline class no family serves; the message is one line for the user."""


def resolve_model_path(name_or_path: str) -> str:
    """`toy`, `toy-flow` -> that built-in pretrained toy's directory (built on first use when the committed copy
    is stale: minutes); anything else unchanged. For loading weights only."""
    from utils.toy import TOYS, build_toy_pipeline

    if name_or_path in TOYS:
        return str(build_toy_pipeline(name=name_or_path))
    return name_or_path


def read_model_index(name_or_path: str, revision: str | None = None, local_only: bool = False) -> dict | None:
    """`model_index.json` of a local directory or a hub id (from the hub cache when `local_only`).
    None when it cannot be read without a download (and `local_only`).

    A toy's is read from its committed copy (assets/toy, assets/toy-flow), there whether or not its weights are
    current: asking which family and sampler a toy has (the argument checks do) must not build or train it; that
    happens when its weights load."""
    from utils.toy import TOYS

    path = str(TOYS[name_or_path].assets_dir) if name_or_path in TOYS else name_or_path
    local = Path(path) / "model_index.json"
    if local.is_file():
        return json.loads(local.read_text())
    if os.path.isdir(path):
        return None
    if local_only:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "model_index.json", revision=revision)
        return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(path, revision=revision)


class ModelFamily:
    """A UNet-based text-to-image pipeline family; an instance wraps one loaded pipeline.

    The pipeline object holds the frozen text encoders, the VAE and the (LoRA-carrying) UNet; the
    trainer moves and casts those, and uses `encode_prompts` for the rollout's conditioning.
    """

    name: ClassVar[str]
    hub_tag: ClassVar[str]  # the model card's tag for the family
    pipeline_class_name: ClassVar[str]
    serves: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s this family trains
    # Loading kwargs that keep the pipeline offline and free of post-processing we do not grade.
    load_kwargs: ClassVar[dict[str, Any]] = {}
    upcast_vae_in_fp16: ClassVar[bool] = False

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    # ------------------------------------------------------------------ class-level facts
    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        variant: str | None = None,
        vae_name_or_path: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ModelFamily:
        """Load the pipeline (weights in `dtype`), optionally with a replacement VAE."""
        kwargs = dict(cls.load_kwargs)
        if vae_name_or_path is not None:
            from diffusers import AutoencoderKL

            vae_path = resolve_model_path(vae_name_or_path)
            has_subfolder = os.path.isfile(os.path.join(vae_path, "vae", "config.json"))
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae_path, subfolder="vae" if has_subfolder else None,
                                                          revision=revision, dtype=dtype)
        pipe = cls.pipeline_class().from_pretrained(resolve_model_path(name_or_path), revision=revision,
                                                     variant=variant, dtype=dtype, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe)

    # ------------------------------------------------------------------ components
    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
                if m is not None]

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The VAE's dtype under mixed precision: fp32 where the family's pipeline would upcast it
        (SDXL's original VAE overflows in fp16; the fp16-fix VAE sets `force_upcast: false`)."""
        if self.upcast_vae_in_fp16 and weight_dtype == torch.float16 and self.vae.config.force_upcast:
            return torch.float32
        return weight_dtype

    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    # ------------------------------------------------------------------ conditioning
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "", guided: bool = True,
                       height: int | None = None, width: int | None = None):
        """The rollout's `utils.rollout.PromptEmbeds` for these prompts (unconditional rows first)."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        return self.text_encoders[0].device

    @staticmethod
    def _negatives(prompts: Sequence[str], negative_prompt: str) -> list[str] | None:
        # The pipelines want a list as long as the prompts; None means "no negative prompt".
        return [negative_prompt] * len(prompts) if negative_prompt else None

    # ------------------------------------------------------------------ LoRA I/O
    @classmethod
    def save_lora_weights(cls, save_directory: str | os.PathLike, unet_lora_layers: dict, **metadata) -> None:
        cls.pipeline_class().save_lora_weights(save_directory, unet_lora_layers=unet_lora_layers, **metadata)

    @classmethod
    def lora_state_dict(cls, lora_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
        state_dict = cls.pipeline_class().lora_state_dict(str(lora_dir))
        return state_dict[0] if isinstance(state_dict, tuple) else state_dict


class StableDiffusion(ModelFamily):
    """SD 1.x / 2.x: one CLIP text encoder, cross-attention conditioning only."""

    name = "sd"
    hub_tag = "stable-diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    serves = ("StableDiffusionPipeline",)
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "", guided: bool = True,
                       height: int | None = None, width: int | None = None):
        from utils.rollout import PromptEmbeds

        cond, uncond = self.pipe.encode_prompt(list(prompts), self._device(), 1, guided,
                                               negative_prompt=self._negatives(prompts, negative_prompt))
        return PromptEmbeds(torch.cat([uncond, cond]) if guided else cond, guided=guided)


class StableDiffusionXL(ModelFamily):
    """SDXL: two text encoders (penultimate hidden states concatenated), the second one's pooled
    embedding and the (original size, crop, target size) time ids as added conditioning."""

    name = "sdxl"
    hub_tag = "stable-diffusion-xl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    serves = ("StableDiffusionXLPipeline",)
    load_kwargs = {"add_watermarker": False}  # a watermark would change the pixels the reward grades
    upcast_vae_in_fp16 = True

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "", guided: bool = True,
                       height: int | None = None, width: int | None = None):
        from utils.rollout import PromptEmbeds

        height, width = height or self.default_size(), width or self.default_size()
        # An empty negative prompt is passed as None, so `force_zeros_for_empty_prompt` gives zero
        # unconditional embeddings, as StableDiffusionXLPipeline does by default.
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            list(prompts), device=self._device(), num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=self._negatives(prompts, negative_prompt))
        projection_dim = (self.pipe.text_encoder_2.config.projection_dim if self.pipe.text_encoder_2 is not None
                          else int(pooled.shape[-1]))
        time_ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=cond.dtype,
                                               text_encoder_projection_dim=projection_dim)
        time_ids = time_ids.to(cond.device).repeat(len(prompts) * (2 if guided else 1), 1)
        if guided:
            cond, pooled = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
        return PromptEmbeds(cond, {"text_embeds": pooled, "time_ids": time_ids}, guided=guided)


FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusion, StableDiffusionXL)


def family_for_class_name(class_name: str) -> type[ModelFamily]:
    for family in FAMILIES:
        if class_name in family.serves:
            return family
    supported = ", ".join(name for f in FAMILIES for name in f.serves)
    raise UnsupportedModelError(f"{class_name} pipelines are not supported; supported: {supported}")


def family_of(name_or_path: str, revision: str | None = None) -> type[ModelFamily]:
    """The family of a local pipeline directory, a hub id, or `toy`."""
    index = read_model_index(name_or_path, revision)
    if index is None or "_class_name" not in index:
        raise UnsupportedModelError(f"{name_or_path!r} is not a diffusers pipeline (no model_index.json)")
    return family_for_class_name(index["_class_name"])


def load_family(name_or_path: str, **kwargs) -> ModelFamily:
    """Pick the family from `model_index.json` and load the pipeline (see `ModelFamily.load`)."""
    return family_of(name_or_path, kwargs.get("revision")).load(name_or_path, **kwargs)
