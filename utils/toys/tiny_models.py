"""Tiny diffusers pipelines built offline from configs, with tokenizers whose vocabularies are generated.

Nothing here downloads anything: tests, benchmarks and the toys' pretraining get real diffusers pipelines
(saved with `save_pretrained`, loaded with `from_pretrained`) in seconds. Layout, one section per job:
- tokenizers: offline tokenizers of the kinds real checkpoints ship (CLIP's byte-level BPE, T5's Unigram);
- shared components: the configs every family's builder uses, written once;
- one builder per pipeline family, randomly initialised with the shapes of diffusers' own pipeline tests
  (the flow-matching ones, FLUX.1 and SD3/SD3.5, shaped where it matters like the real models).
"""

from __future__ import annotations

import json
import os
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# ----------------------------------------------------------------------------------------- tokenizers

# Words the default generated tokenizer knows as whole tokens; anything else falls back to characters.
TINY_WORDS = (
    "a an the of on in with and photo picture painting drawing of "
    "red green blue yellow orange purple pink white black gray brown cyan "
    "circle square triangle shape small big large background "
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon "
    "fox wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake "
    "turtle frog chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of CLIP/GPT-2 byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_clip_tokenizer(
    save_dir: str | os.PathLike | None = None,
    words: tuple[str, ...] = TINY_WORDS,
    model_max_length: int = 77,
) -> CLIPTokenizer:
    """A real `CLIPTokenizer` whose vocabulary is generated instead of downloaded.

    The vocabulary has every byte symbol (alone and word-final, as CLIP's has) plus one BPE merge
    chain per word in `words`, so known words are single tokens and any text still tokenizes.
    """
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in vocab:
                merges.append(f"{parts[0]} {parts[1]}")
                vocab[merged] = len(vocab)
            parts = [merged] + parts[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(save_dir) if save_dir is not None else Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
        tokenizer = CLIPTokenizer(
            vocab=str(directory / "vocab.json"),
            merges=str(directory / "merges.txt"),
            model_max_length=model_max_length,
        )
        if save_dir is not None:
            tokenizer.save_pretrained(directory)
    return tokenizer


def build_t5_tokenizer(words: Iterable[str] = TINY_WORDS, model_max_length: int = 512) -> T5Tokenizer:
    """A real T5 (Unigram) tokenizer whose vocabulary is generated: pad/eos/unk at ids 0/1/2 as T5's, one
    whole-word piece per word in `words`, and every printable ASCII character (alone and after the
    word-start marker), so any ASCII text tokenizes and known words are single tokens.

    Scores are log-probabilities: a known word's piece (-1) beats spelling it out (<= -6). `extra_ids=0`:
    T5's 100 sentinel tokens are for span corruption, which no text encoder here needs."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {piece for piece, _ in vocab}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for word in dict.fromkeys(words):
        add("▁" + word, -1.0)
    for char in string.ascii_letters + string.digits + string.punctuation:
        add("▁" + char, -3.0)
        add(char, -4.0)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# ----------------------------------------------------------------------------------------- shared components

# The tiny CLIP text encoder of diffusers' pipeline tests; `hidden_size` is usually set to the denoiser's width.
TINY_CLIP_TEXT_SIZES = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}


def clip_text_config(tokenizer: CLIPTokenizer, **sizes) -> CLIPTextConfig:
    """A CLIP text-encoder config that fits `tokenizer` (vocabulary, special tokens, context length);
    `sizes` (widths, depth, activation, projection) are the model's own and default to CLIP's."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


# The VAE latent normalisation of the real models (diffusers' vae/config.json of each).
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
# The scheduler configs FLUX.1-dev, FLUX.1-schnell and SD3/SD3.5 ship.
FLUX_DEV_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_SCHNELL_SCHEDULER = {**FLUX_DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
SD3_SCHEDULER = {"shift": 3.0}
# FLUX's and SD3's VAEs have no quant convs; their latents have 16 channels.
FLOW_VAE = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}


def tiny_vae(sample_size: int, **config) -> AutoencoderKL:
    """A 2-block VAE (factor 2) for latents of `sample_size`, as in diffusers' pipeline tests; `config`
    overrides (latent channels, scaling and shift factors, quant convs)."""
    return AutoencoderKL(**{
        "block_out_channels": (32, 64),
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "latent_channels": 4,
        "sample_size": sample_size * 2,
        "norm_num_groups": 32,
        **config,
    })


def tiny_unet(sample_size: int, **config) -> UNet2DConditionModel:
    """A 2-level UNet (the first level without cross-attention) for latents of `sample_size`, as in diffusers'
    pipeline tests; `config` overrides or adds (widths, text conditioning, attention heads)."""
    return UNet2DConditionModel(**{
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 32,
        **config,
    })


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD's DDIM configuration (scaled_linear betas 0.00085 -> 0.012, 1000 steps)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def tiny_t5_encoder(tokenizer: T5Tokenizer, d_model: int) -> T5EncoderModel:
    """A tiny T5 v1.1 encoder (FLUX's and SD3's T5-XXL kind: gated-GELU feed-forward, untied embeddings)."""
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config)


def _saved(pipe: DiffusionPipeline, save_dir: str | os.PathLike | None) -> DiffusionPipeline:
    if save_dir is not None:
        pipe.save_pretrained(save_dir, safe_serialization=True)
    return pipe


# ----------------------------------------------------------------------------------------- Stable Diffusion 1.x/2.x


def build_random_components(
    seed: int = 0,
    sample_size: int = 16,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    model_max_length: int = 77,
    prediction_type: str = "epsilon",
) -> dict:
    """Randomly initialised tiny SD components, the same shapes as diffusers' own pipeline tests.

    `sample_size` is the latent size; with a 2-block VAE the image is twice as large.
    """
    torch.manual_seed(seed)
    unet = tiny_unet(sample_size, block_out_channels=block_out_channels, cross_attention_dim=cross_attention_dim,
                     attention_head_dim=8)
    vae = tiny_vae(sample_size)
    tokenizer = build_clip_tokenizer(model_max_length=model_max_length)
    sizes = {**TINY_CLIP_TEXT_SIZES, "hidden_size": cross_attention_dim}
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, **sizes))
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": sd_ddim_scheduler(prediction_type),
        "safety_checker": None,
        "feature_extractor": None,
    }


def build_random_pipeline(save_dir: str | os.PathLike | None = None, **kwargs) -> StableDiffusionPipeline:
    """A tiny random `StableDiffusionPipeline`; saved with `save_pretrained` when `save_dir` is given."""
    pipe = StableDiffusionPipeline(**build_random_components(**kwargs), requires_safety_checker=False)
    return _saved(pipe, save_dir)


# ----------------------------------------------------------------------------------------- Stable Diffusion XL


def build_random_sdxl_pipeline(
    save_dir: str | os.PathLike | None = None,
    seed: int = 0,
    sample_size: int = 16,
    prediction_type: str = "epsilon",
) -> StableDiffusionXLPipeline:
    """A tiny random `StableDiffusionXLPipeline` (the shapes of diffusers' own SDXL pipeline tests, smaller):
    two text encoders (the second with a projection), pooled-text and time-id conditioning, an Euler
    scheduler as SDXL ships. Images are `2 * sample_size` pixels square by default."""
    torch.manual_seed(seed)
    text_dim, time_dim = 32, 8
    unet = tiny_unet(
        sample_size,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_dim + text_dim,  # 6 time ids + pooled text
        cross_attention_dim=2 * text_dim,  # the two encoders' hidden states, concatenated
    )
    vae = tiny_vae(sample_size, scaling_factor=0.13025)  # SDXL's VAE scale
    tokenizer = build_clip_tokenizer()
    sizes = {**TINY_CLIP_TEXT_SIZES, "hidden_size": text_dim, "num_hidden_layers": 3}
    config = clip_text_config(tokenizer, **sizes, hidden_act="gelu", projection_dim=text_dim)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=CLIPTextModel(config).eval(),
        text_encoder_2=CLIPTextModelWithProjection(config).eval(), tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet.eval(), scheduler=scheduler, add_watermarker=False,
    )
    return _saved(pipe, save_dir)


# ----------------------------------------------------------------------------------------- FLUX.1

def build_random_flux_pipeline(save_dir: str | os.PathLike | None = None, *, guidance_embeds: bool = True,
                               seed: int = 0, latent_channels: int = 16) -> FluxPipeline:
    """A tiny random `FluxPipeline`: FLUX.1-dev-like with `guidance_embeds=True` (distilled guidance input,
    dynamic shift), FLUX.1-schnell-like with False (no guidance input, fixed shift 1). Double- and
    single-stream blocks, 2x2-packed latents (in_channels = 4 x latent channels), CLIP (pooled) + T5.

    The VAE has factor 2 and latents are 2x2-packed, so height and width must be multiples of 4; pass them
    explicitly (FluxPipeline's default size is 128 x vae_scale_factor)."""
    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    text_dim = clip_dim = 32
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=text_dim, pooled_projection_dim=clip_dim,
                                         guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6))  # the axes' sum is the head dim
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER))
    clip_sizes = {**TINY_CLIP_TEXT_SIZES, "hidden_size": clip_dim, "hidden_act": "gelu"}
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(16, **{**FLOW_VAE, "latent_channels": latent_channels}, **FLUX_VAE_FACTORS).eval(),
        text_encoder=CLIPTextModel(clip_text_config(clip_tokenizer, **clip_sizes)).eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny_t5_encoder(t5_tokenizer, text_dim).eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return _saved(pipe, save_dir)


# ----------------------------------------------------------------------------------------- Stable Diffusion 3/3.5


def build_random_sd3_pipeline(save_dir: str | os.PathLike | None = None, *, seed: int = 0, sample_size: int = 16,
                              latent_channels: int = 16, num_attention_heads: int = 4,
                              attention_head_dim: int = 8) -> StableDiffusion3Pipeline:
    """A tiny random `StableDiffusion3Pipeline` shaped like SD3.5-Medium: CLIP-L + CLIP-G (both with
    projection; pooled = both projections) + T5, patch size 2, QK RMS-norm, a dual-attention (`attn2`)
    first block and a context-pre-only last block, the scheduler's static shift 3. `sample_size` is the
    default latent size (images are 2 x sample_size pixels by default); height and width must be multiples
    of 4 (VAE factor x patch size), at most 2 x 2 x pos_embed_max_size (128).

    Every real SD3/SD3.5 has hidden size = 64 x depth, and ComfyUI's SD3 loader derives the depth from it:
    `num_attention_heads=2, attention_head_dim=64` (2 blocks) builds such a one (5 MB)."""
    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    clip_l, clip_g = 32, 48
    t5_dim = 96  # >= clip_l + clip_g: the pipeline pads the CLIP features up to T5's width (and would truncate)
    hidden = num_attention_heads * attention_head_dim
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=latent_channels,
                                        out_channels=latent_channels, num_layers=2,
                                        attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
                                        joint_attention_dim=t5_dim, caption_projection_dim=hidden,
                                        pooled_projection_dim=clip_l + clip_g, pos_embed_max_size=32,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")

    def clip_with_projection(width: int) -> CLIPTextModelWithProjection:
        sizes = {**TINY_CLIP_TEXT_SIZES, "hidden_size": width, "hidden_act": "gelu"}
        return CLIPTextModelWithProjection(clip_text_config(clip_tokenizer, **sizes, projection_dim=width)).eval()

    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=tiny_vae(sample_size, **{**FLOW_VAE, "latent_channels": latent_channels}, **SD3_VAE_FACTORS).eval(),
        text_encoder=clip_with_projection(clip_l),
        tokenizer=clip_tokenizer,
        text_encoder_2=clip_with_projection(clip_g),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=tiny_t5_encoder(t5_tokenizer, t5_dim).eval(),
        tokenizer_3=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return _saved(pipe, save_dir)
