"""Qwen-Image (`QwenImagePipeline`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from utils.families.base import License, classifier_free_guidance, register
from utils.families.flow import FlowTransformerFamily, TransformerPromptEmbeds

# diffusers' Qwen-Image LoRA script adapts the image stream's attention (its default `--lora_layers`); `+ff` adds
# the text stream's attention and both streams' feed-forward layers (img_mlp / txt_mlp are Qwen's names), the
# text-stream-only ones block by block (`QwenImage.target_modules`).
QWEN_IMAGE_TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "img_mlp.net.0.proj",
                     "img_mlp.net.2"),
    "diffusers": ("to_q", "to_k", "to_v", "to_out.0"),  # train_dreambooth_lora_qwen_image.py's default
}
# What only feeds the text stream's next block: the transformer outputs the image stream, so in the last block
# these reach nothing (an adapter there never gets a gradient, which DDP refuses).
TEXT_STREAM_ONLY = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")


class QwenImagePromptEmbeds(TransformerPromptEmbeds):
    """Qwen-Image's conditioning; prompts encoded alone have their own lengths and no mask (`_encode`)."""

    @classmethod
    def join(cls, parts: Sequence[TransformerPromptEmbeds]) -> QwenImagePromptEmbeds:
        """A batch's conditioning from its prompts' own (`--precompute_prompt_embeddings`), as the pipeline pads a
        batch: each prompt's embeddings zero-padded to the longest, the mask 0 on the padding (none if no padding)."""

        def pad(kwargs: list[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
            if kwargs[0] is None:
                return None
            embeds = [d["encoder_hidden_states"] for d in kwargs]
            length = max(e.shape[1] for e in embeds)
            # Decided from the shapes, not the mask's values (which a memory estimate's fake tensors do not have): a
            # prompt encoded alone is never padded, so it comes without a mask.
            if all(e.shape[1] == length and "encoder_hidden_states_mask" not in d for d, e in zip(kwargs, embeds)):
                return {"encoder_hidden_states": torch.cat(embeds)}
            masks = [d.get("encoder_hidden_states_mask", torch.ones(e.shape[:2], dtype=torch.long, device=e.device))
                     for d, e in zip(kwargs, embeds, strict=True)]
            embeds = torch.cat([F.pad(e, (0, 0, 0, length - e.shape[1])) for e in embeds])
            mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks])
            return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}

        return cls(pad([p.cond for p in parts]), pad([p.uncond for p in parts]))


@register
class QwenImage(FlowTransformerFamily):
    """Qwen-Image: one Qwen2.5-VL text encoder (its last hidden state, the chat template's head dropped, with a
    padding mask), 2x2-packed latents of the Qwen-Image VAE (per-channel latents_mean/std, decoded as one-frame
    video), the timestep divided by 1000, the dynamic shift `mu` from the packed token count. No guidance
    embedding: guidance is true classifier-free guidance (a second pass on the negative prompt) with
    `--true_cfg_scale` > 1 and a negative prompt, the guided velocity rescaled to the norm of the conditional one
    per token, as QwenImagePipeline does (its model card samples with a negative prompt of " ")."""

    display_name = "Qwen-Image"
    name = "qwen-image"
    shard_block_classes = ("QwenImageTransformerBlock",)  # FSDP2 (--shard) wraps each
    pipeline_sample_size = 128  # QwenImagePipeline's default_sample_size (latents; its config has none)

    @classmethod
    def native_size(cls, denoiser_config, vae_scale_factor):
        return cls.pipeline_sample_size * vae_scale_factor

    @classmethod
    def vae_scale_factor_of(cls, vae_config):
        """QwenImagePipeline's: 2 ** the number of the VAE's (spatial) downsamplings."""
        return 2 ** len((vae_config or {}).get("temperal_downsample", (False,) * 3))
    hub_tag = "qwen-image"
    pipeline_class_name = "QwenImagePipeline"
    serves = ("QwenImagePipeline",)
    target_presets = QWEN_IMAGE_TARGET_PRESETS
    preset_notes = {"diffusers": "train_dreambooth_lora_qwen_image.py's default, = attention"}
    default_max_sequence_length = 512  # QwenImagePipeline.__call__'s
    max_sequence_length_limit = 1024  # its check_inputs refuses more
    options = (*FlowTransformerFamily.options, "true_cfg_scale")
    default_true_cfg_scale = 4.0  # QwenImagePipeline.__call__'s (on only with a negative prompt)
    licenses = {"qwen/qwen-image": License("apache-2.0")}
    # Its loader takes the alpha tensors for another format's and then matches no module: diffusers users load
    # the plain file.
    ui_lora_loads_in_diffusers = False

    def __init__(self, pipe, max_sequence_length: int | None = None, true_cfg_scale: float | None = None) -> None:
        super().__init__(pipe, max_sequence_length)
        self.true_cfg_scale = self.default_true_cfg_scale if true_cfg_scale is None else true_cfg_scale

    @classmethod
    def uses_guidance_scale(cls, denoiser_config):
        return False  # the transformer's guidance input is unused ("for future guidance-distilled models")

    @classmethod
    def rollout_defaults(cls, denoiser_config):
        # 50 steps as QwenImagePipeline; guidance_scale reaches nothing (0: off, as FLUX.1-schnell's).
        return {"num_inference_steps": 50, "max_sequence_length": cls.default_max_sequence_length,
                "guidance_scale": 0.0, "true_cfg_scale": cls.default_true_cfg_scale}

    @classmethod
    def option_problem(cls, args, denoiser_config):
        if (problem := super().option_problem(args, denoiser_config)) is not None:
            return problem
        # The pipeline runs true CFG only with both; an explicit scale without a negative prompt, or a negative
        # prompt with the scale at 1, would be silently ignored.
        if args.true_cfg_scale is not None and args.true_cfg_scale > 1 and not args.negative_prompt:
            return ("--true_cfg_scale needs --negative_prompt: Qwen-Image's true CFG guides away from the negative "
                    "prompt (its model card uses --negative_prompt ' ')")
        if args.negative_prompt and args.true_cfg_scale is not None and args.true_cfg_scale <= 1:
            return "--negative_prompt acts on Qwen-Image only with --true_cfg_scale > 1 (true CFG, as QwenImagePipeline)"
        return None

    @classmethod
    def target_modules(cls, names, denoiser_config=None):
        """The presets, and with `attention+ff` the text stream's queries, output projection and MLP of every
        block but the last, named block by block."""
        targets = super().target_modules(names, denoiser_config)
        if "attention+ff" in names:
            if denoiser_config is None or "num_layers" not in denoiser_config:
                raise ValueError("the attention+ff preset of Qwen-Image needs the transformer's config (num_layers)")
            text = [f"transformer_blocks.{i}.{m}" for i in range(denoiser_config["num_layers"] - 1)
                    for m in TEXT_STREAM_ONLY]
            targets += [t for t in text if t not in targets]
        return targets

    @property
    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4  # the transformer sees 2x2 patches of the latent

    def set_timesteps(self, scheduler, num_inference_steps, latent_size, device=None):
        import numpy as np
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        config = scheduler.config
        mu = calculate_shift((latent_size[0] // 2) * (latent_size[1] // 2),  # the packed image's token count
                             config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_inference_steps, device,
                           sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), mu=mu)

    def _encode(self, prompts) -> dict[str, torch.Tensor]:
        embeds, mask = self.pipe.encode_prompt(prompt=list(prompts), device=self._device(), num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length)
        # encode_prompt gives no mask when no prompt is padded; the transformer then attends to every token
        return {"encoder_hidden_states": embeds} | ({} if mask is None else {"encoder_hidden_states_mask": mask})

    @torch.no_grad()
    def encode_prompts(self, prompts, negative_prompt="", guided=True, height=None, width=None
                       ) -> QwenImagePromptEmbeds:
        # Whether to guide is the pipeline's rule (a scale > 1 and a negative prompt), not `guided`: the
        # rollout's guidance_scale does not reach Qwen-Image.
        true_cfg = self.true_cfg_scale > 1 and bool(negative_prompt)
        return QwenImagePromptEmbeds(self._encode(prompts),
                                       self._encode([negative_prompt] * len(prompts)) if true_cfg else None)

    def predict(self, denoiser, x_t, t, cond: TransformerPromptEmbeds, guidance_scale):
        batch, channels, height, width = x_t.shape
        packed = self.pack(x_t)
        timestep = t.expand(batch).to(x_t.dtype) / 1000
        img_shapes = [[(1, height // 2, width // 2)]] * batch  # the RoPE grid: one frame of packed tokens

        def call(kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
            return denoiser(hidden_states=packed, timestep=timestep, guidance=None, img_shapes=img_shapes,
                            return_dict=False, **kwargs)[0]

        out = call(cond.cond)
        if cond.guided:
            combined = classifier_free_guidance(call(cond.uncond), out, self.true_cfg_scale)
            # QwenImagePipeline keeps each token's conditional velocity norm
            out = combined * (torch.norm(out, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
        return self._unpack(out, height, width)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, h/2 * w/2, 4C]: the latents `QwenImagePipeline(latents=...)` takes."""
        from diffusers import QwenImagePipeline

        return QwenImagePipeline._pack_latents(latents, *latents.shape)

    def _unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed [B, h/2 * w/2, 4C] -> [B, C, h, w] for latents of height x width."""
        from diffusers import QwenImagePipeline

        scale = self.vae_scale_factor
        return QwenImagePipeline._unpack_latents(latents, height * scale, width * scale, scale)[:, :, 0]

    def to_pipeline_latents(self, latents):
        return self.pack(latents)

    def from_pipeline_latents(self, latents, height, width):
        scale = self.vae_scale_factor
        return self._unpack(latents, height // scale, width // scale)

    def pipeline_kwargs(self):
        return {**super().pipeline_kwargs(), "true_cfg_scale": self.true_cfg_scale}

    @torch.no_grad()
    def sample_latents(self, prompt, generators, *, negative_prompt="", num_inference_steps, guidance_scale, eta=0.0,
                       height, width):
        # guidance_scale=None: QwenImagePipeline warns that any value is ignored
        return super().sample_latents(prompt, generators, negative_prompt=negative_prompt,
                                      num_inference_steps=num_inference_steps, guidance_scale=None, eta=eta,
                                      height=height, width=width)

    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """As QwenImagePipeline: z * std + mean per channel (as it computes it: divided by 1 / std, in the VAE's
        dtype), decoded as a one-frame video (`decode_frame`)."""
        from utils.rollout.loop import vae_images

        config = vae.config
        latents = latents.to(vae.dtype)
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        latents = latents / inverse_std + mean
        return vae_images(vae, latents, lambda z: decode_frame(vae, z))

    @classmethod
    def pipeline_timestep(cls, pipe, timestep):
        """QwenImagePipeline calls its transformer with the timestep / 1000 in the latents' dtype; it keeps the
        step's own timestep in `current_timestep`."""
        current = getattr(pipe, "current_timestep", None)
        return current if current is not None else timestep * 1000


def decode_frame(vae, latents: torch.Tensor) -> torch.Tensor:
    """`vae.decode(latents as one frame)[:, :, 0]` bit for bit, without the VAE's feature cache.

    AutoencoderKLQwenImage decodes a video frame by frame, each causal conv and temporal upsampler keeping a copy
    of its input in a cache for the next frame. An image is one frame: every cache read finds nothing (a causal
    conv then zero-pads in time as with no cache, a temporal upsampler skips its time conv as with no cache) and
    nothing reads what is written. Decoding without the cache gives the same image, does not hold those copies,
    and leaves every decoder block a pure function that gradient checkpointing can recompute
    (utils/rollout/vae_checkpointing.py). A tiled VAE decodes through its own (cached) tiled path."""
    if vae.use_tiling:
        return vae.decode(latents.unsqueeze(2), return_dict=False)[0][:, :, 0]
    if (hook := getattr(vae, "_hf_hook", None)) is not None:  # what `decode`'s apply_forward_hook runs (offload)
        hook.pre_forward(vae)
    parts = latents.split(1) if vae.use_slicing else [latents]
    frames = [vae.decoder(vae.post_quant_conv(z.unsqueeze(2))) for z in parts]
    return torch.cat(frames).clamp(-1.0, 1.0)[:, :, 0]
