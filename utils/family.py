"""Model families: how to load a diffusers pipeline, condition and call its denoiser, and rebuild it for inference.

This is the only module that names diffusers pipeline classes. The trainer, the rollout, validation, LoRA
I/O and the evaluator ask the family of a model (picked from `model_index.json`'s `_class_name`) for its
components, its prompt conditioning, its denoiser call and noise parametrisation, and its pipeline class.
Adding a family means adding one class below and listing it in `FAMILIES`. The module is long on purpose:
keeping every pipeline-specific fact in one place is what lets the rollout and the trainer stay family-agnostic.

Two generations of denoiser:
- UNets (SD 1.x/2.x, SDXL): variance-preserving noise, any diffusers sampler, classifier-free guidance;
- flow-matching transformers (SD3/SD3.5, FLUX.1): rectified flow over the pipeline's own sigmas, CLIP + T5
  prompts, FLUX's distilled guidance and 2x2-packed latents.

Prompt conditioning goes through the pipeline's own `encode_prompt`, the timesteps are set as the pipeline
sets them and the denoiser is called as the pipeline calls it, so the training rollout sees exactly the
embeddings, noise levels and predictions the diffusers pipeline computes for the same prompts and noise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from utils.errors import UserError
from utils.lora import COMFYUI_WEIGHTS_NAME, KOHYA_WEIGHTS_NAME
from utils.schedulers import ROLLOUT_SCHEDULERS


class UnsupportedModelError(UserError, ValueError):
    """A model whose pipeline class no family serves; the message is one line for the user."""


def resolve_model_path(name_or_path: str) -> str:
    """`toy`, `toy-flow` -> that built-in pretrained toy's directory (built on first use when the committed copy
    is stale: minutes); anything else unchanged. For loading weights only."""
    from utils.toy import TOYS, build_toy_pipeline

    if name_or_path in TOYS:
        return str(build_toy_pipeline(name=name_or_path))
    return name_or_path


def _read_model_json(name_or_path: str, relative: str, revision: str | None, local_only: bool,
                     download: Callable[[str], dict]) -> dict | None:
    """The JSON file `relative` of a model: a toy's committed copy, a local directory's file, or a hub id's from the
    hub cache (`local_only`) or `download(name_or_path)`. None when a local directory lacks it, or the cache does."""
    from utils.toy import TOYS

    path = str(TOYS[name_or_path].assets_dir) if name_or_path in TOYS else name_or_path
    local = Path(path) / relative
    if local.is_file():
        return json.loads(local.read_text())
    if os.path.isdir(path):
        return None
    if local_only:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, relative, revision=revision)
        return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None
    return download(path)


def read_model_index(name_or_path: str, revision: str | None = None, local_only: bool = False) -> dict | None:
    """`model_index.json` of a local directory or a hub id (from the hub cache when `local_only`).
    None when it cannot be read without a download (and `local_only`).

    A toy's is read from its committed copy (assets/toy, assets/toy-flow), there whether or not its weights are
    current: asking which family and sampler a toy has (the argument checks do) must not build or train it; that
    happens when its weights load."""

    def download(path: str) -> dict:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(path, revision=revision)

    return _read_model_json(name_or_path, "model_index.json", revision, local_only, download)


def read_denoiser_config(name_or_path: str, revision: str | None = None, local_only: bool = False) -> dict | None:
    """The denoiser's `config.json` (`unet/` or `transformer/`, as the model's family names it), read as
    `read_model_index` reads the index: no weights. The argument checks take the LoRA presets, the rollout
    defaults and the resume fingerprint from it. None when the model's family is unknown or the file cannot
    be read without a download (and `local_only`)."""
    index = read_model_index(name_or_path, revision, local_only)
    if index is None:
        return None
    try:
        relative = f"{family_for_class_name(index.get('_class_name', '?')).denoiser_name}/config.json"
    except UnsupportedModelError:
        return None

    def download(path: str) -> dict:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, relative, revision=revision)).read_text())

    return _read_model_json(name_or_path, relative, revision, local_only, download)


# ---------------------------------------------------------------------------------------------- conditioning


@dataclass
class PromptEmbeds:
    """UNet conditioning for a batch; with guidance, the unconditional rows come first."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: {"text_embeds", "time_ids"}
    guided: bool = True

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Repeat each prompt n times, keeping the [uncond..., cond...] layout."""

        def rep(x: torch.Tensor) -> torch.Tensor:
            if not self.guided:
                return x.repeat_interleave(n, dim=0)
            uncond, cond = x.chunk(2)
            return torch.cat([uncond.repeat_interleave(n, dim=0), cond.repeat_interleave(n, dim=0)])

        extra = {k: rep(v) for k, v in self.added_cond_kwargs.items()} if self.added_cond_kwargs else None
        return PromptEmbeds(rep(self.encoder_hidden_states), extra, self.guided)


@dataclass
class TransformerPromptEmbeds:
    """Transformer conditioning for a batch: the keyword arguments of the denoiser call besides the latents and
    the timestep, for the prompts (`cond`) and, when guided, for the negative or empty prompt (`uncond`)."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    @cached_property
    def batched(self) -> dict[str, torch.Tensor]:
        """The [uncond, cond] rows of every argument, for one call on a doubled batch (SD3's guidance): built
        on first use and kept, so a rollout's many denoiser calls do not copy the prompt embeddings each time."""
        return {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.cond}

    def repeat_interleave(self, n: int) -> TransformerPromptEmbeds:
        """Each prompt n times; per-token ids (FLUX's `txt_ids`, one [L, 3] for the batch) are shared."""

        def rep(kwargs: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            if kwargs is None:
                return None
            return {k: v if k == "txt_ids" else v.repeat_interleave(n, dim=0) for k, v in kwargs.items()}

        return TransformerPromptEmbeds(rep(self.cond), rep(self.uncond))


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


# ---------------------------------------------------------------------------------------------- families


class ModelFamily:
    """A text-to-image pipeline family; an instance wraps one loaded pipeline.

    The pipeline object holds the frozen text encoders, the VAE and the (LoRA-carrying) denoiser (a UNet or
    a transformer), loaded in the run's dtype. The family owns everything that differs between
    families, so the rollout and the trainer have no family-specific branch: the denoiser call with its
    guidance (`predict`), the prompt conditioning (`encode_prompts`), the noise parametrisation and timesteps
    of a rollout (`parametrisation`), the latent shape, the size rule, the rollout defaults, the LoRA presets
    and the LoRA file format.
    """

    name: ClassVar[str]
    hub_tag: ClassVar[str]  # the model card's tag for the family
    pipeline_class_name: ClassVar[str]
    serves: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s this family trains
    denoiser_name: ClassVar[str]  # the pipeline's denoiser component, and the prefix of its LoRA keys
    # Loading kwargs that keep the pipeline offline and free of post-processing we do not grade.
    load_kwargs: ClassVar[dict[str, Any]] = {}
    upcast_vae_in_fp16: ClassVar[bool] = False
    size_multiple: ClassVar[int] = 8  # image height and width: the VAE factor times the denoiser's patch size
    rollout_schedulers: ClassVar[tuple[str, ...]]  # diffusers samplers the training rollout can step
    default_scheduler: ClassVar[str]  # --scheduler when not given
    target_presets: ClassVar[dict[str, tuple[str, ...]]]  # --lora_target_modules presets
    # Trainer options only some families take (named as their argparse dests); the others refuse them.
    options: ClassVar[tuple[str, ...]] = ()
    # The LoRA file `export_ui_lora` writes, and the tools that load it (what the model card and the end of
    # training say).
    ui_lora_name: ClassVar[str] = KOHYA_WEIGHTS_NAME
    ui_lora_tools: ClassVar[str] = "ComfyUI and AUTOMATIC1111"
    ui_lora_loads_in_diffusers: ClassVar[bool] = True  # the pipeline's load_lora_weights reads that file too

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    # ------------------------------------------------------------------ class-level facts
    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def rollout_defaults(cls, denoiser_config: dict | None) -> dict[str, Any]:
        """What the trainer uses for the rollout options a user leaves out (argparse dests -> values)."""
        return {"num_inference_steps": 50, "guidance_scale": 7.5}

    @classmethod
    def evaluation_defaults(cls, denoiser_config: dict | None) -> dict[str, Any]:
        """The evaluator's sampler settings (EvalSettings fields) a user leaves out."""
        return {"scheduler": "ddim", "num_inference_steps": 20, "guidance_scale": 7.5}

    @classmethod
    def uses_guidance_scale(cls, denoiser_config: dict | None) -> bool:
        """Whether `--guidance_scale` reaches the denoiser at all."""
        return True

    @classmethod
    def option_problem(cls, args: Any, denoiser_config: dict | None) -> str | None:
        """The first trainer option (parsed `args`, before the family's defaults) this family cannot honour, as
        the one line for the user; None when it can honour them all."""
        model = f"{cls.pipeline_class_name} models"
        for name in dict.fromkeys(option for family in FAMILIES for option in family.options):
            if getattr(args, name, None) is not None and name not in cls.options:
                takers = " and ".join(f.pipeline_class_name for f in FAMILIES if name in f.options)
                return f"--{name} is for {takers} models; {model} do not take it"
        for name in ("resolution", "height", "width"):
            if getattr(args, name) % cls.size_multiple:
                return f"--{name} must be a multiple of {cls.size_multiple} for {model}, got {getattr(args, name)}"
        if args.guidance_scale is not None and not cls.uses_guidance_scale(denoiser_config):
            return (f"--guidance_scale does not reach this model: its {cls.denoiser_name} takes no guidance "
                    "(as FLUX.1-schnell's); leave it out")
        return None

    @classmethod
    def target_modules(cls, names: Sequence[str], denoiser_config: dict | None = None) -> list[str]:
        """`--lora_target_modules` with presets expanded to PEFT module names; other names kept, in order."""
        from utils.lora import expand_target_modules

        return expand_target_modules(names, cls.target_presets)

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        variant: str | None = None,
        vae_name_or_path: str | None = None,
        dtype: torch.dtype = torch.float32,
        vae_dtype: torch.dtype | None = None,
        quantize_base: str | None = None,
        **options: Any,
    ) -> ModelFamily:
        """Load the pipeline with its weights in `dtype` (the VAE in `vae_dtype`, default `dtype`), optionally
        with a replacement VAE, and with `quantize_base="nf4"` the denoiser in bitsandbytes 4-bit (QLoRA;
        needs CUDA). `options`: the family's `options` (e.g. max_sequence_length)."""
        kwargs = dict(cls.load_kwargs)
        vae_dtype = vae_dtype or dtype
        if vae_name_or_path is not None:
            from diffusers import AutoencoderKL

            vae_path = resolve_model_path(vae_name_or_path)
            has_subfolder = os.path.isfile(os.path.join(vae_path, "vae", "config.json"))
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae_path, subfolder="vae" if has_subfolder else None,
                                                          revision=revision, dtype=vae_dtype)
        if quantize_base is not None:
            kwargs["quantization_config"] = cls.quantization_config(quantize_base, dtype)
        pipe = cls.pipeline_class().from_pretrained(resolve_model_path(name_or_path), revision=revision,
                                                     variant=variant, dtype={"default": dtype, "vae": vae_dtype},
                                                     **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, **options)

    @classmethod
    def quantization_config(cls, quantize_base: str, compute_dtype: torch.dtype):
        """The denoiser's weights in bitsandbytes 4-bit NF4, computing in the weight dtype, as diffusers' FLUX
        QLoRA example loads them; the text encoders and the VAE stay as they are."""
        from diffusers import BitsAndBytesConfig, PipelineQuantizationConfig

        if quantize_base != "nf4":
            raise ValueError(f"unknown quantization {quantize_base!r}")
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
        return PipelineQuantizationConfig(quant_mapping={cls.denoiser_name: nf4})

    # ------------------------------------------------------------------ components
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def quantized(self) -> bool:
        """The denoiser's base weights are quantized (`--quantize_base`): they cannot be cast or moved."""
        return bool(getattr(self.denoiser, "is_quantized", False))

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipe, name, None) for name in names) if m is not None]

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The rollout's noise for images of height x width: [B, C, h, w] (FLUX's too: it packs only around
        its transformer call)."""
        return (batch_size, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    @classmethod
    def vae_load_dtype(cls, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype to load the VAE in for a run in `weight_dtype`: fp32 where `vae_dtype` may keep it so
        (its config decides, once loaded)."""
        return torch.float32 if cls.upcast_vae_in_fp16 else weight_dtype

    def vae_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The VAE's dtype under mixed precision: fp32 where the family's pipeline would upcast it
        (SDXL's original VAE overflows in fp16; the fp16-fix VAE sets `force_upcast: false`)."""
        if self.upcast_vae_in_fp16 and weight_dtype == torch.float16 and self.vae.config.force_upcast:
            return torch.float32
        return weight_dtype

    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.vae_scale_factor

    # ------------------------------------------------------------------ sampling with the pipeline
    def pipeline_kwargs(self) -> dict[str, Any]:
        """The pipeline's `__call__` arguments that the family's own trainer options set (none for the UNets)."""
        return {}

    @torch.no_grad()
    def sample_latents(self, prompt: str, generators: Sequence[torch.Generator], *, negative_prompt: str = "",
                       num_inference_steps: int, guidance_scale: float, eta: float = 0.0, height: int,
                       width: int) -> torch.Tensor:
        """The family's pipeline's final latents [N, C, h, w] for `prompt`, image k from `generators[k]`'s noise
        (validation decodes them as the rollout decodes its own)."""
        return self.pipe(prompt, negative_prompt=negative_prompt or None, num_images_per_prompt=len(generators),
                         generator=list(generators), num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, eta=eta, height=height, width=width,
                         output_type="latent").images

    @classmethod
    def pipeline_timestep(cls, pipe, timestep: torch.Tensor | float) -> torch.Tensor | float:
        """The scheduler timestep of a denoiser call the pipeline `pipe` makes with `timestep` (AIG reads the
        step from it): the same number, but for FLUX."""
        return timestep

    # ------------------------------------------------------------------ the rollout's questions
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "", guided: bool = True,
                       height: int | None = None, width: int | None = None):
        """The conditioning `predict` takes for these prompts (`guided`: classifier-free guidance is on)."""
        raise NotImplementedError

    def predict(self, denoiser: Callable, x_t: torch.Tensor, t: torch.Tensor, cond, guidance_scale: float
                ) -> torch.Tensor:
        """The guided prediction of `denoiser` (the family's denoiser, or a wrapper with its call signature) on
        the model input x_t ([B, C, h, w]) at timestep t, called as the family's pipeline calls it."""
        raise NotImplementedError

    def parametrisation(self, scheduler, config, latent_size: tuple[int, int], device: torch.device | str,
                        generator: torch.Generator | None = None):
        """`scheduler` set up for a rollout of `config.num_inference_steps` steps on latents of `latent_size`
        (h, w), as the family's pipeline sets it, behind the parametrisation the rollout asks
        (`utils.parametrisation`)."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        return self.text_encoders[0].device

    @staticmethod
    def _negatives(prompts: Sequence[str], negative_prompt: str) -> list[str] | None:
        # The pipelines want a list as long as the prompts; None means "no negative prompt".
        return [negative_prompt] * len(prompts) if negative_prompt else None

    # ------------------------------------------------------------------ LoRA I/O
    @classmethod
    def lora_layers(cls, denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The adapter weights as the pipeline's `save_lora_weights` takes them."""
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)

    @classmethod
    def peft_lora_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A saved LoRA file's denoiser weights, keyed as PEFT's `set_peft_model_state_dict` wants them."""
        prefix = cls.denoiser_name + "."
        return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}

    @classmethod
    def save_lora_weights(cls, save_directory: str | os.PathLike, lora_layers: dict, **metadata) -> None:
        cls.pipeline_class().save_lora_weights(save_directory, **{f"{cls.denoiser_name}_lora_layers": lora_layers},
                                               **metadata)

    @classmethod
    def lora_state_dict(cls, lora_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
        state_dict = cls.pipeline_class().lora_state_dict(str(lora_dir))
        return state_dict[0] if isinstance(state_dict, tuple) else state_dict

    @classmethod
    def export_ui_lora(cls, lora_file: str | os.PathLike) -> Path:
        """Write, next to the diffusers-format `lora_file`, the LoRA file ComfyUI and AUTOMATIC1111 load
        (they ignore safetensors metadata and match their own key names); returns its path. For the UNet
        families: kohya's format with a per-module alpha tensor (utils/lora.py `export_kohya`)."""
        from utils.lora import export_kohya

        return export_kohya(lora_file)


# ---------------------------------------------------------------------------------------------- UNet families

# diffusers' LoRA training scripts adapt the attention projections; NeMo-Aligner adds the feed-forward layers.
UNET_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_k", "to_q", "to_v", "to_out.0"),
    "attention+ff": ("to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}


class UNetFamily(ModelFamily):
    """The UNet generation (SD 1.x/2.x, SDXL): a variance-preserving noise schedule, any diffusers sampler,
    classifier-free guidance on an [uncond, cond] batch."""

    denoiser_name = "unet"
    rollout_schedulers = ROLLOUT_SCHEDULERS
    default_scheduler = "ddim"
    target_presets = UNET_TARGET_PRESETS

    def default_size(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    def predict(self, denoiser, x_t, t, cond: PromptEmbeds, guidance_scale):
        """One UNet call on the [uncond, cond] batch at the (scaled) model input x_t, combined with
        classifier-free guidance."""
        out = denoiser(
            torch.cat([x_t, x_t]) if cond.guided else x_t,
            t,
            encoder_hidden_states=cond.encoder_hidden_states,
            added_cond_kwargs=cond.added_cond_kwargs,
            return_dict=False,
        )[0]
        if not cond.guided:
            return out
        return classifier_free_guidance(*out.chunk(2), guidance_scale)

    def parametrisation(self, scheduler, config, latent_size, device, generator=None):
        from utils.parametrisation import VariancePreserving

        return VariancePreserving(scheduler, config.num_inference_steps, device, config.eta, generator)

    @classmethod
    def lora_layers(cls, denoiser):
        # The UNet LoRA key style of diffusers' SD/SDXL scripts (`convert_state_dict_to_diffusers`).
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(super().lora_layers(denoiser))

    @classmethod
    def peft_lora_state_dict(cls, state_dict):
        from diffusers.utils import convert_unet_state_dict_to_peft

        return convert_unet_state_dict_to_peft(super().peft_lora_state_dict(state_dict))


class StableDiffusion(UNetFamily):
    """SD 1.x / 2.x: one CLIP text encoder, cross-attention conditioning only."""

    name = "sd"
    hub_tag = "stable-diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    serves = ("StableDiffusionPipeline",)
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str = "", guided: bool = True,
                       height: int | None = None, width: int | None = None) -> PromptEmbeds:
        cond, uncond = self.pipe.encode_prompt(list(prompts), self._device(), 1, guided,
                                               negative_prompt=self._negatives(prompts, negative_prompt))
        return PromptEmbeds(torch.cat([uncond, cond]) if guided else cond, guided=guided)


class StableDiffusionXL(UNetFamily):
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
                       height: int | None = None, width: int | None = None) -> PromptEmbeds:
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


# ---------------------------------------------------------------------------------------------- flow transformers

# The attention projections of both streams (diffusers' FLUX and SD3 LoRA scripts), and with `+ff` the
# feed-forward layers of both streams (the FLUX script's default adds these). Short names match every block:
# `to_q` also adapts SD3.5's dual-attention `attn2` and FLUX's single blocks' attention.
TRANSFORMER_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"),
}
MAX_SEQUENCE_LENGTH = 512  # the T5 prompt length both pipelines accept at most


class FlowTransformerFamily(ModelFamily):
    """The flow-matching transformers (SD3/SD3.5, FLUX.1): rectified flow sampled by the pipeline's own
    FlowMatchEulerDiscreteScheduler over its sigmas, CLIP + T5 prompts (`--max_sequence_length` T5 tokens),
    image sizes in multiples of 16 (VAE factor 8 x 2x2 patches), LoRA files with the PEFT keys as they are
    (`transformer.<module>.lora_A/B.weight`, as diffusers' FLUX/SD3 scripts save them)."""

    denoiser_name = "transformer"
    size_multiple = 16
    rollout_schedulers = ("FlowMatchEulerDiscreteScheduler",)
    default_scheduler = "model"
    target_presets = TRANSFORMER_TARGET_PRESETS
    options = ("max_sequence_length",)
    ui_lora_name = COMFYUI_WEIGHTS_NAME
    ui_lora_tools = "ComfyUI"
    default_max_sequence_length: ClassVar[int]

    @classmethod
    def export_ui_lora(cls, lora_file: str | os.PathLike) -> Path:
        """ComfyUI's FLUX and SD3 loaders read diffusers' transformer keys; they need a per-module alpha tensor
        (utils/lora.py `export_comfyui`). diffusers users load the plain file."""
        from utils.lora import export_comfyui

        return export_comfyui(lora_file, component=cls.denoiser_name)

    @classmethod
    def evaluation_defaults(cls, denoiser_config):
        """The pipeline's own sampler, and the steps and guidance the trainer defaults to."""
        defaults = cls.rollout_defaults(denoiser_config)
        return {"scheduler": "model", "num_inference_steps": defaults["num_inference_steps"],
                "guidance_scale": defaults["guidance_scale"]}

    def pipeline_kwargs(self):
        return {"max_sequence_length": self.max_sequence_length}

    @torch.no_grad()
    def sample_latents(self, prompt, generators, *, negative_prompt="", num_inference_steps, guidance_scale, eta=0.0,
                       height, width):
        """Image k starts from the noise the rollout would draw for it ([1, C, h, w] from `generators[k]`, fp32),
        handed to the pipeline as its `latents` (FLUX: packed, as `FluxPipeline` takes and returns them). The
        flow-matching sampler takes no `eta`."""
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(self.latent_shape(len(generators), height, width), generator=list(generators),
                             device=self._device(), dtype=torch.float32)
        latents = self.pipe(prompt, negative_prompt=negative_prompt or None, num_images_per_prompt=len(generators),
                            latents=self.to_pipeline_latents(noise), num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, height=height, width=width, output_type="latent",
                            **self.pipeline_kwargs()).images
        return self.from_pipeline_latents(latents, height, width)

    def to_pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] latents as the pipeline's `__call__` takes them."""
        return latents

    def from_pipeline_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's `output_type="latent"` result for height x width images as [B, C, h, w]."""
        return latents

    def __init__(self, pipe, max_sequence_length: int | None = None) -> None:
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length

    @classmethod
    def rollout_defaults(cls, denoiser_config):
        return {"num_inference_steps": 28, "max_sequence_length": cls.default_max_sequence_length}

    def parametrisation(self, scheduler, config, latent_size, device, generator=None):
        from utils.parametrisation import RectifiedFlow

        self.set_timesteps(scheduler, config.num_inference_steps, latent_size, device)
        return RectifiedFlow(scheduler, generator)

    def set_timesteps(self, scheduler, num_inference_steps: int, latent_size: tuple[int, int],
                      device: torch.device | str | None = None) -> None:
        """The scheduler's timesteps and sigmas exactly as the pipeline's `__call__` sets them."""
        raise NotImplementedError

    def _device(self) -> torch.device:
        return self.pipe.text_encoder.device


class StableDiffusion3(FlowTransformerFamily):
    """SD3 / SD3.5: CLIP-L + CLIP-G + T5, classifier-free guidance on an [uncond, cond] batch with
    `--negative_prompt`, the timestep in [0, 1000], the scheduler's static shift."""

    name = "sd3"
    hub_tag = "stable-diffusion-3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    serves = ("StableDiffusion3Pipeline",)
    default_max_sequence_length = 256  # StableDiffusion3Pipeline.__call__'s
    ui_lora_loads_in_diffusers = False  # its loader wants 'lora' in every key: the alpha tensors are refused

    @classmethod
    def rollout_defaults(cls, denoiser_config):
        return {**super().rollout_defaults(denoiser_config), "guidance_scale": 7.0}  # the pipeline's default

    def set_timesteps(self, scheduler, num_inference_steps, latent_size, device=None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", None):  # not on SD3/SD3.5's own scheduler configs
            patch = self.denoiser.config.patch_size
            config = scheduler.config
            kwargs["mu"] = calculate_shift((latent_size[0] // patch) * (latent_size[1] // patch),
                                           config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                           config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        retrieve_timesteps(scheduler, num_inference_steps, device, **kwargs)

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt="", guided=True, height=None, width=None
                       ) -> TransformerPromptEmbeds:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self._device(), num_images_per_prompt=1,
            do_classifier_free_guidance=guided, negative_prompt=self._negatives(prompts, negative_prompt),
            max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if guided else None
        return TransformerPromptEmbeds(cond, uncond)

    def predict(self, denoiser, x_t, t, cond: TransformerPromptEmbeds, guidance_scale):
        if cond.guided:
            kwargs, x_in = cond.batched, torch.cat([x_t, x_t])
        else:
            kwargs, x_in = cond.cond, x_t
        out = denoiser(hidden_states=x_in, timestep=t.expand(x_in.shape[0]), return_dict=False, **kwargs)[0]
        return classifier_free_guidance(*out.chunk(2), guidance_scale) if cond.guided else out


class Flux(FlowTransformerFamily):
    """FLUX.1: CLIP-L (pooled) + T5, 2x2-packed latents with position ids, the timestep divided by 1000, the
    dynamic shift `mu` from the image's token count. FLUX.1-dev has a guidance embedding: `--guidance_scale`
    is its distilled guidance, one forward pass per step; FLUX.1-schnell has none. True classifier-free
    guidance (a second pass on the negative prompt) only with `--true_cfg_scale` > 1 and a negative prompt,
    as FluxPipeline does."""

    name = "flux"
    hub_tag = "flux"
    pipeline_class_name = "FluxPipeline"
    serves = ("FluxPipeline",)
    default_max_sequence_length = 512  # FluxPipeline.__call__'s
    options = (*FlowTransformerFamily.options, "true_cfg_scale")

    def __init__(self, pipe, max_sequence_length: int | None = None, true_cfg_scale: float = 1.0) -> None:
        super().__init__(pipe, max_sequence_length)
        self.true_cfg_scale = true_cfg_scale

    @classmethod
    def uses_guidance_scale(cls, denoiser_config):
        return bool((denoiser_config or {}).get("guidance_embeds", True))

    @classmethod
    def rollout_defaults(cls, denoiser_config):
        if cls.uses_guidance_scale(denoiser_config):  # FLUX.1-dev: BFL's recipe
            defaults = {**super().rollout_defaults(denoiser_config), "guidance_scale": 3.5}
        else:  # FLUX.1-schnell: 4 steps and a 256-token prompt (its model card), no guidance
            defaults = {"num_inference_steps": 4, "max_sequence_length": 256, "guidance_scale": 0.0}
        return {**defaults, "true_cfg_scale": 1.0}  # FluxPipeline's: off

    @classmethod
    def option_problem(cls, args, denoiser_config):
        if (problem := super().option_problem(args, denoiser_config)) is not None:
            return problem
        # FluxPipeline runs true CFG only with both; either alone would be silently ignored.
        true_cfg = args.true_cfg_scale is not None and args.true_cfg_scale > 1
        if true_cfg and not args.negative_prompt:
            return "--true_cfg_scale needs --negative_prompt: FLUX's true CFG guides away from the negative prompt"
        if args.negative_prompt and not true_cfg:
            return ("--negative_prompt acts on FLUX only with --true_cfg_scale > 1 (true CFG, a second pass per "
                    "step, as FluxPipeline); --guidance_scale is FLUX's distilled guidance and takes no negative prompt")
        return None

    @classmethod
    def target_modules(cls, names, denoiser_config=None):
        """The presets, and with `attention+ff` the single blocks' MLP input (`proj_mlp`) and fused output
        (`proj_out`), named block by block: a bare `proj_out` would also adapt the transformer's final layer."""
        targets = super().target_modules(names, denoiser_config)
        if "attention+ff" in names:
            if denoiser_config is None or "num_single_layers" not in denoiser_config:
                raise ValueError("the attention+ff preset of FLUX needs the transformer's config (num_single_layers)")
            single = [f"single_transformer_blocks.{i}.proj_out" for i in range(denoiser_config["num_single_layers"])]
            targets += [t for t in ("proj_mlp", *single) if t not in targets]
        return targets

    @property
    def has_guidance_embedding(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4  # the transformer sees 2x2 patches of the latent

    def set_timesteps(self, scheduler, num_inference_steps, latent_size, device=None):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        config = scheduler.config
        mu = calculate_shift((latent_size[0] // 2) * (latent_size[1] // 2),  # the packed image's token count
                             config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)

    def _encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self._device(), num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids}

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt="", guided=True, height=None, width=None
                       ) -> TransformerPromptEmbeds:
        # The distilled guidance needs no negative rows (`guided` is about CFG, which FLUX.1 does not use);
        # true CFG does, when asked.
        true_cfg = self.true_cfg_scale > 1 and bool(negative_prompt)
        return TransformerPromptEmbeds(self._encode(prompts),
                                       self._encode([negative_prompt] * len(prompts)) if true_cfg else None)

    def predict(self, denoiser, x_t, t, cond: TransformerPromptEmbeds, guidance_scale):
        from diffusers import FluxPipeline

        batch, channels, height, width = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, batch, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x_t.device, x_t.dtype)
        guidance = None
        if self.has_guidance_embedding:
            guidance = torch.full([1], guidance_scale, device=x_t.device, dtype=torch.float32).expand(batch)
        timestep = t.expand(batch).to(x_t.dtype) / 1000

        def call(kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
            return denoiser(hidden_states=packed, timestep=timestep, guidance=guidance, img_ids=img_ids,
                            return_dict=False, **kwargs)[0]

        out = call(cond.cond)
        if cond.guided:
            out = classifier_free_guidance(call(cond.uncond), out, self.true_cfg_scale)
        scale = self.vae_scale_factor
        return FluxPipeline._unpack_latents(out, height * scale, width * scale, scale)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, h/2 * w/2, 4C]: the latents `FluxPipeline(latents=...)` takes."""
        from diffusers import FluxPipeline

        return FluxPipeline._pack_latents(latents, *latents.shape)

    def to_pipeline_latents(self, latents):
        return self.pack(latents)

    def from_pipeline_latents(self, latents, height, width):
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)

    def pipeline_kwargs(self):
        return {**super().pipeline_kwargs(), "true_cfg_scale": self.true_cfg_scale}

    @classmethod
    def pipeline_timestep(cls, pipe, timestep):
        """FluxPipeline calls its transformer with the timestep / 1000, cast to the latents' dtype (in bf16 two
        neighbouring steps can round to one number); it keeps the step's own timestep in `current_timestep`."""
        current = getattr(pipe, "current_timestep", None)
        return current if current is not None else timestep * 1000


FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)


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
