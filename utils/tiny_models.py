"""Tiny diffusers pipelines built offline from configs, with tokenizers whose vocabularies are generated.

Nothing here downloads anything: tests, benchmarks and the toy's pretraining get real diffusers pipelines
(saved with `save_pretrained`, loaded with `from_pretrained`) in seconds. Layout, one section per job:
- tokenizers: offline tokenizers of the kinds real checkpoints ship;
- shared components: the configs every family's builder uses, written once;
- one builder per pipeline family, randomly initialised with the shapes of diffusers' own pipeline tests.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


def tiny_vae(sample_size: int, **config) -> AutoencoderKL:
    """A 2-block VAE (factor 2) for latents of `sample_size`, as in diffusers' pipeline tests."""
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=sample_size * 2,
        norm_num_groups=32,
        **config,
    )


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
    unet = UNet2DConditionModel(
        block_out_channels=block_out_channels,
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = tiny_vae(sample_size)
    tokenizer = build_clip_tokenizer(model_max_length=model_max_length)
    sizes = {**TINY_CLIP_TEXT_SIZES, "hidden_size": cross_attention_dim}
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, **sizes))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
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
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_dim + text_dim,  # 6 time ids + pooled text
        cross_attention_dim=2 * text_dim,  # the two encoders' hidden states, concatenated
        norm_num_groups=32,
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
