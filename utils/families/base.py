"""The model-family interface (`ModelFamily`) and the registry of families.

A family wraps one loaded diffusers pipeline and answers every question the trainer, the rollout, validation,
LoRA I/O and the evaluator ask of a model: its components, its prompt conditioning, its denoiser call and noise
parametrisation, its size rule and defaults, its LoRA presets and file formats. The concrete families live in
the sibling modules, one per model family; each registers itself with `register` so that a model's
`model_index.json` `_class_name` picks it (`family_for_class_name`).

Prompt conditioning goes through the pipeline's own `encode_prompt`, the timesteps are set as the pipeline
sets them and the denoiser is called as the pipeline calls it, so the training rollout sees exactly the
embeddings, noise levels and predictions the diffusers pipeline computes for the same prompts and noise.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from utils.errors import UserError
from utils.lora.adapters import expand_target_modules
from utils.lora.exports import export_kohya
from utils.lora.files import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from utils.rollout.vae_checkpointing import checkpoint_vae


@dataclass(frozen=True)
class License:
    """A model's license as a hub card's YAML states it: an id, and for `other` the license's name and link."""

    id: str
    name: str | None = None
    link: str | None = None


class UnsupportedModelError(UserError, ValueError):
    """A model whose pipeline class no family serves; the message is one line for the user."""


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


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
    display_name: ClassVar[str]  # how --help and the docs name the family
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
    # --lora_target_modules presets; `diffusers` is the default of diffusers' DreamBooth LoRA script for the family
    target_presets: ClassVar[dict[str, tuple[str, ...]]]
    preset_notes: ClassVar[dict[str, str]] = {}  # what a preset's names catch besides the obvious, for --help
    # Trainer options only some families take (named as their argparse dests); the others refuse them.
    options: ClassVar[tuple[str, ...]] = ()
    # The LoRA file `export_ui_lora` writes, and the tools that load it (what the model card and the end of
    # training say).
    ui_lora_name: ClassVar[str] = KOHYA_WEIGHTS_NAME
    ui_lora_tools: ClassVar[str] = "ComfyUI and AUTOMATIC1111"
    ui_lora_loads_in_diffusers: ClassVar[bool] = True  # the pipeline's load_lora_weights reads that file too
    # The licenses of base models a card must name even when their own card is not on disk, as their hub
    # repositories declare them: lower-case hub id -> License.
    licenses: ClassVar[dict[str, License]] = {}
    inference_in_bf16: ClassVar[bool] = False  # the card's snippet loads the pipeline in bf16 (billions of weights)
    # The denoiser's transformer block classes: `--shard` (utils/run/sharding.py) splits the denoiser across
    # processes block by block, each gathered whole only for its own forward and backward. Empty: not sharded.
    shard_block_classes: ClassVar[tuple[str, ...]] = ()

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
    def native_size(cls, denoiser_config: dict | None, vae_scale_factor: int) -> int | None:
        """The image side the model was made for, as its pipeline defaults `height` and `width` (the denoiser
        config's `sample_size` latents times the VAE factor), from the configs alone, so the argument checks
        know it before any weights load; None where the config does not say."""
        size = (denoiser_config or {}).get("sample_size")
        return size * vae_scale_factor if isinstance(size, int) else None

    @classmethod
    def vae_scale_factor_of(cls, vae_config: dict | None) -> int:
        """The VAE's downsampling factor, as the family's pipeline computes it from `vae/config.json` (8
        without one)."""
        channels = (vae_config or {}).get("block_out_channels")
        return 2 ** (len(channels) - 1) if channels else 8

    @classmethod
    def evaluation_options(cls, denoiser_config: dict | None) -> dict[str, Any]:
        """The defaults of the family's own `options` (e.g. FLUX's T5 length): the trainer's, so a model is
        evaluated as it trains."""
        defaults = cls.rollout_defaults(denoiser_config)
        return {name: defaults.get(name) for name in cls.options}

    @classmethod
    def uses_guidance_scale(cls, denoiser_config: dict | None) -> bool:
        """Whether `--guidance_scale` reaches the denoiser at all."""
        return True

    @classmethod
    def option_problem(cls, args: Any, denoiser_config: dict | None) -> str | None:
        """The first trainer option (parsed `args`, before the family's defaults) this family cannot honour, as
        the one line for the user; None when it can honour them all."""
        model = f"{cls.pipeline_class_name} models"
        for name in family_option_names():
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
    def denoiser_config_with(cls, denoiser_config: dict, model_index: dict) -> dict:
        """The denoiser config the class-level answers read (`read_denoiser_config`), with any fact of the
        pipeline's `model_index.json` they need, under keys starting with `_` (not the resume fingerprint's)."""
        return denoiser_config

    @classmethod
    def target_modules(cls, names: Sequence[str], denoiser_config: dict | None = None) -> list[str]:
        """`--lora_target_modules` with presets expanded to PEFT module names; other names kept, in order."""
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
        components: dict[str, Any] | None = None,
        **options: Any,
    ) -> ModelFamily:
        """Load the pipeline with its weights in `dtype` (the VAE in `vae_dtype`, default `dtype`), optionally with
        a replacement VAE, with `quantize_base="nf4"` the denoiser in bitsandbytes 4-bit (QLoRA; needs CUDA), and
        `components` (name -> module, or None: not loaded) used as given. `options`: the family's (`options`)."""
        from utils.toys.toy import resolve_model_path  # imports the toys' trainers: only when loading

        kwargs = {**cls.load_kwargs, **(components or {})}
        vae_dtype = vae_dtype or dtype
        if vae_name_or_path is not None:
            from diffusers import AutoencoderKL

            vae_path = resolve_model_path(vae_name_or_path)
            has_subfolder = os.path.isfile(os.path.join(vae_path, "vae", "config.json"))
            kwargs["vae"] = AutoencoderKL.from_pretrained(vae_path, subfolder="vae" if has_subfolder else None,
                                                          revision=revision, dtype=vae_dtype)
        if quantize_base is not None:
            kwargs["quantization_config"] = cls.quantization_config(quantize_base, dtype)
        pipe = cls.pipeline_class().from_pretrained(resolve_model_path(name_or_path), revision=revision, variant=variant,
                                                     dtype={"default": dtype, "vae": vae_dtype}, **kwargs)
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
    @classmethod
    def denoiser_of(cls, pipe) -> torch.nn.Module:
        """The denoiser of a pipeline of this family (e.g. one a user loaded with `from_pretrained`)."""
        return getattr(pipe, cls.denoiser_name)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.denoiser_of(self.pipe)

    @property
    def quantized(self) -> bool:
        """The denoiser's base weights are quantized (`--quantize_base`): they cannot be cast or moved."""
        return bool(getattr(self.denoiser, "is_quantized", False))

    def enable_gradient_checkpointing(self, vae_blocks: bool = False) -> list[str]:
        """`--gradient_checkpointing` on the denoiser and the VAE decoder: per up block as diffusers does, or with
        `vae_blocks` (`--vae_block_checkpointing`) per decoder block, which holds less during the decode's
        backward (utils/rollout/vae_checkpointing.py). Returns the components checkpointed."""
        done = [self.denoiser_name]
        self.denoiser.enable_gradient_checkpointing()
        if (vae := checkpoint_vae(self.vae, vae_blocks)) is not None:
            done.append(vae)
        return done

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
        """`native_size` of the loaded model (the pipeline's own default where its config has no size)."""
        return (self.native_size(dict(self.denoiser.config), self.vae_scale_factor)
                or self.pipe.default_sample_size * self.vae_scale_factor)

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The rollout's latents -> images in [0, 1], differentiable, as the family's pipeline decodes them."""
        from utils.rollout.loop import decode

        return decode(vae, latents)

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

    def negative_prompt_kwargs(self, negative_prompt: str, batch_size: int = 1) -> dict:
        """The pipeline's `__call__` arguments for `negative_prompt` ("": none) on `batch_size` prompts."""
        return {"negative_prompt": [negative_prompt] * batch_size} if negative_prompt else {}

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
        (`utils.rollout.parametrisation`)."""
        raise NotImplementedError

    # Where the prompts are encoded and the rollout runs when the text encoders live elsewhere between encodings
    # (the trainer's --offload_text_encoders sets it); None: where the text encoders are.
    execution_device: torch.device | None = None

    def _device(self) -> torch.device:
        return self.execution_device or self.text_encoders[0].device

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
    def ui_lora_card(cls, ui_lora: str) -> tuple[str, str]:
        """What the model card says of the file `export_ui_lora` wrote: the tools it loads in (its row of the
        Files table), and why they need it rather than the diffusers file."""
        return ("ComfyUI (`models/loras/`, the LoRA loader node) and AUTOMATIC1111 (`models/Lora/`): per-module "
                "alpha tensors, module names these tools match",
                f"ComfyUI and AUTOMATIC1111 need `{ui_lora}`: they ignore the safetensors metadata, and ComfyUI "
                f"matches none of the attention keys of `{LORA_WEIGHTS_NAME}`.")

    @classmethod
    def export_ui_lora(cls, lora_file: str | os.PathLike, output_file: str | os.PathLike | None = None) -> Path:
        """Write, next to the diffusers-format `lora_file` (or to `output_file`), the LoRA file ComfyUI and
        AUTOMATIC1111 load (they ignore safetensors metadata and match their own key names); returns its path.
        For the UNet families: kohya's format with a per-module alpha tensor (`utils.lora.exports`)."""
        return export_kohya(lora_file, output_file)


# The registered families, in the order `--help` and error messages list them (filled by `register`).
FAMILIES: list[type[ModelFamily]] = []


def register(family: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make `family` the one that trains the pipelines in its `serves`."""
    FAMILIES.append(family)
    return family


def family_option_names() -> tuple[str, ...]:
    """The options only some families take (every registered family's `options`), in registration order."""
    return tuple(dict.fromkeys(option for family in FAMILIES for option in family.options))


def family_for_class_name(class_name: str) -> type[ModelFamily]:
    for family in FAMILIES:
        if class_name in family.serves:
            return family
    supported = ", ".join(name for f in FAMILIES for name in f.serves)
    raise UnsupportedModelError(f"{class_name} pipelines are not supported; supported: {supported}")
