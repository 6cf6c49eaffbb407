"""Tiny Stable Diffusion pipelines built offline: random ones for tests, a pretrained toy for demos.

Everything here is built from configs and a generated vocabulary, so it needs no model hub.
The output is a standard diffusers `StableDiffusionPipeline` directory, so the trainer,
`pipe.load_lora_weights(...)` and every other diffusers tool treat it like a real checkpoint.

The pretrained toy (32x32 coloured shapes, "a red circle on a blue background"):

    python -m utils.toy                                   # path of the toy (committed copy, or build + cache)
    python -m utils.toy --output_dir assets/toy --force   # rebuild the committed copy (~4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Words the generated tokenizer knows as whole tokens; anything else falls back to characters.
TOY_WORDS = (
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
    words: tuple[str, ...] = TOY_WORDS,
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


def _tiny_vae(sample_size: int, **config) -> AutoencoderKL:
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


def _tiny_text_config(tokenizer: CLIPTokenizer, hidden_size: int, **config) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        **config,
    )


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
    vae = _tiny_vae(sample_size)
    tokenizer = build_clip_tokenizer(model_max_length=model_max_length)
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, cross_attention_dim, num_hidden_layers=2,
                                                   max_position_embeddings=model_max_length))
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
    if save_dir is not None:
        pipe.save_pretrained(save_dir, safe_serialization=True)
    return pipe


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
    vae = _tiny_vae(sample_size, scaling_factor=0.13025)  # SDXL's VAE scale
    tokenizer = build_clip_tokenizer()
    config = _tiny_text_config(tokenizer, text_dim, num_hidden_layers=3, hidden_act="gelu", projection_dim=text_dim)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=CLIPTextModel(config).eval(), text_encoder_2=CLIPTextModelWithProjection(config).eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet.eval(), scheduler=scheduler, add_watermarker=False,
    )
    if save_dir is not None:
        pipe.save_pretrained(save_dir, safe_serialization=True)
    return pipe


# =====================================================================================================
# Pretrained toy model (issue 4): training code. Everything from this banner down to the "end of the
# hashed toy training code" banner is hashed by `toy_code_hash()` (with the tokenizer builder above), so
# an edit here invalidates the committed weights and the cache; edits elsewhere in this file do not.
# =====================================================================================================

TOY_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.18, 0.70, 0.24),
    "blue": (0.16, 0.30, 0.86),
    "yellow": (0.95, 0.85, 0.20),
    "purple": (0.68, 0.20, 0.80),  # magenta-leaning: a bluish purple is too easily taken for blue
    "white": (0.94, 0.94, 0.94),
}
TOY_SHAPES = ("circle", "square", "triangle")
TOY_RESOLUTION = 32
TOY_SEED = 0
# Words the toy's tokenizer keeps whole: its own list, so that growing TOY_WORDS does not invalidate it.
_TOY_VOCAB = ("a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "shape", "background",
              "small", "big", *TOY_COLORS, *TOY_SHAPES)


def toy_caption(color: str, shape: str, background: str | None = None) -> str:
    """The caption of one toy image; `background=None` leaves the background unsaid."""
    caption = f"a {color} {shape}"
    return caption if background is None else f"{caption} on a {background} background"


def toy_prompts(with_background: bool = True) -> list[str]:
    """The toy's natural prompts: every colour x shape (18), then every colour x shape x other background (90)."""
    prompts = [toy_caption(c, s) for c in TOY_COLORS for s in TOY_SHAPES]
    if with_background:
        prompts += [toy_caption(c, s, b) for c in TOY_COLORS for s in TOY_SHAPES for b in TOY_COLORS if b != c]
    return prompts


def render_toy_images(
    color: torch.Tensor,
    background: torch.Tensor,
    shape: torch.Tensor,
    center: torch.Tensor,
    radius: torch.Tensor,
    resolution: int = TOY_RESOLUTION,
    supersample: int = 4,
) -> torch.Tensor:
    """Anti-aliased shapes: colours `[N, 3]` in [0, 1], shape ids `[N]` (index into TOY_SHAPES),
    centres `[N, 2]` (x, y) and radii `[N]` in pixels. Returns images `[N, 3, H, W]` in [0, 1]."""
    side = resolution * supersample
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / supersample
    x, y = coords.view(1, 1, side), coords.view(1, side, 1)
    cx, cy, r = center[:, 0].view(-1, 1, 1), center[:, 1].view(-1, 1, 1), radius.view(-1, 1, 1)
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    # The square's half-side and the triangle's size are scaled so the three shapes cover similar areas.
    square = ((x - cx).abs() <= 0.85 * r) & ((y - cy).abs() <= 0.85 * r)
    top, bottom = cy - r, cy + 0.8 * r
    half_width = ((y - top) / (bottom - top)).clamp(0, 1) * 1.15 * r
    triangle = (y >= top) & (y <= bottom) & ((x - cx).abs() <= half_width)
    s = shape.view(-1, 1, 1)
    mask = torch.where(s == 0, circle, torch.where(s == 1, square, triangle)).float()
    alpha = torch.nn.functional.avg_pool2d(mask[:, None], supersample)
    return alpha * color[:, :, None, None] + (1 - alpha) * background[:, :, None, None]


def sample_toy_dataset(
    per_combination: int, generator: torch.Generator, resolution: int = TOY_RESOLUTION
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (colour, shape, other background) combination `per_combination` times, at a random position
    and size with slight colour jitter. Returns images `[N, 3, H, W]` in [0, 1] and labels `[N, 3]`
    (colour, shape, background indices into TOY_COLORS / TOY_SHAPES)."""
    n_colors, n_shapes = len(TOY_COLORS), len(TOY_SHAPES)
    combos = [(c, s, b) for c in range(n_colors) for s in range(n_shapes) for b in range(n_colors) if b != c]
    labels = torch.tensor(combos, dtype=torch.long).repeat(per_combination, 1)
    n = labels.shape[0]
    palette = torch.tensor(list(TOY_COLORS.values()))

    def jitter(rgb: torch.Tensor) -> torch.Tensor:
        return (rgb + 0.05 * (2 * torch.rand(rgb.shape, generator=generator) - 1)).clamp(0, 1)

    radius = resolution * (0.19 + 0.13 * torch.rand(n, generator=generator))
    # A 2-pixel margin: every image keeps a pure-background border.
    lo, span = radius + 2, resolution - 2 * (radius + 2)
    center = lo[:, None] + span[:, None] * torch.rand(n, 2, generator=generator)
    fg, bg = jitter(palette[labels[:, 0]]), jitter(palette[labels[:, 2]])
    images = torch.cat([
        render_toy_images(*parts, resolution=resolution)
        for parts in zip(fg.split(512), bg.split(512), labels[:, 1].split(512), center.split(512), radius.split(512))
    ])
    return images, labels


@dataclass(frozen=True)
class ToyTrainConfig:
    """Every knob of the toy build. The defaults take ~4 minutes on 2 CPU cores."""

    seed: int = TOY_SEED
    per_combination: int = 48  # 90 combinations -> 4320 training images
    vae_block_out_channels: tuple[int, ...] = (32, 32, 32)  # 3 blocks: 32x32 images <-> 8x8x4 latents
    vae_steps: int = 350
    vae_batch_size: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    vae_align_weight: float = 1.0
    unet_block_out_channels: tuple[int, ...] = (64, 64)
    text_hidden_size: int = 32
    prediction_type: str = "v_prediction"
    unet_steps: int = 900
    unet_batch_size: int = 64
    unet_lr: float = 1e-3
    uncond_prob: float = 0.1  # empty captions, so classifier-free guidance has an unconditional model
    short_caption_prob: float = 0.2  # "a red circle", background unsaid
    offset_noise: float = 0.1
    min_snr_gamma: float = 5.0


def make_toy_scheduler(prediction_type: str = "v_prediction") -> DDIMScheduler:
    """SD's DDIM configuration (scaled_linear betas 0.00085 -> 0.012, 1000 steps)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
    )


def _toy_modules(cfg: ToyTrainConfig, tokenizer: CLIPTokenizer) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]:
    latent_size = TOY_RESOLUTION // 2 ** (len(cfg.vae_block_out_channels) - 1)
    n_levels = len(cfg.unet_block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=cfg.unet_block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=32,
        # A pooled caption embedding added to the time embedding reaches every ResNet block: colour is a
        # global property, and this pathway learns it much faster than cross-attention alone.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )
    vae = AutoencoderKL(
        sample_size=TOY_RESOLUTION,
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.vae_block_out_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_block_out_channels),
        latent_channels=4,
        norm_num_groups=32,
        mid_block_add_attention=False,  # the toy images need none, and it costs a third of the VAE's time
    )
    # Frozen at its random init: random CLIP features still separate the captions (the UNet learns to read them).
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=cfg.text_hidden_size,
            intermediate_size=4 * cfg.text_hidden_size,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
        )
    )
    return unet, vae, text_encoder


def _cosine_lr(step: int, total: int, warmup: int = 50) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train_vae(vae: AutoencoderKL, images: torch.Tensor, cfg: ToyTrainConfig, g: torch.Generator,
               log: Callable[[str], None]) -> float:
    """Reconstruction + small KL + latent alignment; returns the scaling factor (1 / latent std, as SD's 0.18215)."""
    x_all = images * 2 - 1
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_channels = vae.config.latent_channels
    # Start with small posterior noise (log-variance bias -5): at the default 0 the decoder first sees
    # latents drowned in unit noise and reconstruction stalls until the KL gives way.
    with torch.no_grad():
        vae.quant_conv.bias[latent_channels:] -= 5.0  # quant_conv's outputs are (mean, logvar)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.vae_steps))
    vae.train()
    for step in range(cfg.vae_steps):
        x = x_all[torch.randint(len(x_all), (cfg.vae_batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        mse = (recon - x).pow(2).mean()
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
        # Tie latent channels 0-2 to the downsampled image: a smooth, image-like latent space is far easier
        # for a small UNet to learn in minutes than the arbitrary one a plain autoencoder finds.
        align = (posterior.mean[:, :3] - torch.nn.functional.avg_pool2d(x, scale)).pow(2).mean()
        loss = mse + cfg.vae_kl_weight * kl + cfg.vae_align_weight * align
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae  step {step:4d}  mse {mse.item():.4f}  kl {kl.item():.3f}  align {align.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x).latent_dist.mean for x in x_all[:1024].split(256)])
    return float(1.0 / latents.std())


def _encode_captions(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def _train_unet(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    labels: torch.Tensor,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: DDIMScheduler,
    cfg: ToyTrainConfig,
    g: torch.Generator,
    log: Callable[[str], None],
) -> None:
    """Denoising on SD's noise schedule with caption dropout (for classifier-free guidance)."""
    colors = list(TOY_COLORS)
    # The text encoder is frozen, so each distinct caption is encoded once: "" + short + full captions.
    full = [toy_caption(colors[c], TOY_SHAPES[s], colors[b]) for c, s, b in labels.tolist()]
    short = [toy_caption(colors[c], TOY_SHAPES[s]) for c, s, _ in labels.tolist()]
    table = [""] + sorted(set(full) | set(short))
    index = {caption: i for i, caption in enumerate(table)}
    embeddings = _encode_captions(text_encoder, tokenizer, table)
    full_idx, short_idx = torch.tensor([index[c] for c in full]), torch.tensor([index[c] for c in short])

    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if cfg.prediction_type == "epsilon":
        loss_weight = snr.clamp(max=cfg.min_snr_gamma) / snr  # min-SNR (eps-loss = x0-loss * snr)
    else:
        # v-prediction: at high noise eps ~ x_t is a near-identity the tiny UNet cannot fit precisely in
        # minutes, while v ~ -x0 is easy and is exactly where the caption matters. Min-SNR-style cap of the
        # (easy) low-noise steps; v-loss = x0-loss * (1 + snr).
        loss_weight = (cfg.min_snr_gamma / (1 + snr)).clamp(max=1.0)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, cfg.unet_steps))
    unet.train()
    b = cfg.unet_batch_size
    for step in range(cfg.unet_steps):
        idx = torch.randint(len(latents), (b,), generator=g)
        u = torch.rand(b, generator=g)
        caption = torch.where(u < cfg.uncond_prob + cfg.short_caption_prob, short_idx[idx], full_idx[idx])
        caption = torch.where(u < cfg.uncond_prob, 0, caption)
        x0 = latents[idx]
        # Offset noise: without it SD's schedule can hardly move an image's mean colour (flat backgrounds).
        noise = torch.randn(x0.shape, generator=g) + cfg.offset_noise * torch.randn(b, x0.shape[1], 1, 1, generator=g)
        t = torch.randint(scheduler.config.num_train_timesteps, (b,), generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if cfg.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = unet(x_t, t, embeddings[caption]).sample
        loss = ((pred - target).pow(2).mean(dim=(1, 2, 3)) * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step:4d}  loss {loss.item():.4f}")
    unet.eval()


def train_toy_pipeline(cfg: ToyTrainConfig | None = None, log: Callable[[str], None] = print) -> StableDiffusionPipeline:
    """Pretrain the toy from scratch: render the data set, train the VAE, then the UNet on its latents."""
    cfg = cfg or ToyTrainConfig()
    torch.manual_seed(cfg.seed)  # module initialisation
    g = torch.Generator().manual_seed(cfg.seed)  # data, batches, noise
    tokenizer = build_clip_tokenizer(words=_TOY_VOCAB)
    unet, vae, text_encoder = _toy_modules(cfg, tokenizer)
    text_encoder.eval().requires_grad_(False)
    scheduler = make_toy_scheduler(cfg.prediction_type)
    images, labels = sample_toy_dataset(cfg.per_combination, g)
    log(f"data: {len(images)} images {TOY_RESOLUTION}x{TOY_RESOLUTION}")
    scaling = _train_vae(vae, images, cfg, g, log)
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(256)]) * scaling
    log(f"latents {tuple(latents.shape[1:])}, scaling_factor {scaling:.4f}")
    _train_unet(unet, latents, labels, text_encoder, tokenizer, scheduler, cfg, g, log)
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_toy_pipeline(pipe: StableDiffusionPipeline, directory: Path) -> None:
    """save_pretrained, then UNet and VAE weights stored as fp16 (half the size; diffusers loads them as fp32).
    The text encoder stays fp32: transformers would load fp16 weights as an fp16 model."""
    from safetensors.torch import load_file, save_file

    pipe.save_pretrained(directory, safe_serialization=True)
    for sub in ("unet", "vae"):
        for file in (directory / sub).glob("*.safetensors"):
            state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(file).items()}
            save_file(state, file, metadata={"format": "pt"})
    (directory / PROMPTS_FILE).write_text("\n".join(toy_prompts()) + "\n")


# =====================================================================================================
# End of the hashed toy training code. Below: the cache / committed-copy logic and the CLI.
# =====================================================================================================

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy"
BUILD_INFO_FILE = "toy_build.json"
PROMPTS_FILE = "prompts.txt"
_HASH_BEGIN = "# Pretrained toy model (issue 4): training code."
_HASH_END = "# End of the hashed toy training code."


def toy_code_hash() -> str:
    """sha256 of the code that determines the toy's weights: the training section of this file plus the
    tokenizer builder it uses. Comments count too (cheap to rebuild, and never stale by accident)."""
    text = Path(__file__).read_text(encoding="utf-8")
    section = text[text.index(_HASH_BEGIN):text.index(_HASH_END)]
    tokenizer_code = inspect.getsource(_bytes_to_unicode) + inspect.getsource(build_clip_tokenizer)
    return hashlib.sha256((section + tokenizer_code).encode("utf-8")).hexdigest()


def cache_dir() -> Path:
    """`$DRAFTPLUS_CACHE`, else `~/.cache/draftplus`."""
    return Path(os.environ.get("DRAFTPLUS_CACHE") or Path.home() / ".cache" / "draftplus")


def read_build_info(directory: str | os.PathLike) -> dict | None:
    """The toy_build.json of a built toy directory, or None if it is not a complete build."""
    directory = Path(directory)
    info = directory / BUILD_INFO_FILE
    if not info.is_file() or not (directory / "model_index.json").is_file():
        return None
    try:
        return json.loads(info.read_text())
    except json.JSONDecodeError:
        return None


def _config_record(cfg: ToyTrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as read back from toy_build.json


def is_current_build(directory: str | os.PathLike, code_hash: str | None = None,
                     config: ToyTrainConfig | None = None) -> bool:
    """Whether `directory` holds a complete toy built by the current code with `config` (default: defaults)."""
    info = read_build_info(directory)
    return (info is not None and info.get("code_hash") == (code_hash or toy_code_hash())
            and info.get("config") == _config_record(config or ToyTrainConfig()))


def _build_into(target: Path, code_hash: str, cfg: ToyTrainConfig, log: Callable[[str], None]) -> None:
    """Train into a temporary sibling, then move the files into `target`: an interrupted build never leaves
    a directory that looks complete (toy_build.json, the completeness marker, is moved last)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # Every core we may use: launchers (accelerate, OMP_NUM_THREADS=1) often lower torch's default.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    start = time.time()
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.tmp-") as tmp:
            tmp = Path(tmp)
            pipe = train_toy_pipeline(cfg, log=lambda m: log(f"[{time.time() - start:5.0f}s] {m}"))
            save_toy_pipeline(pipe, tmp)
            info = {
                "code_hash": code_hash,
                "seconds": round(time.time() - start, 1),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "config": _config_record(cfg),
            }
            (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            target.mkdir(exist_ok=True)
            (target / BUILD_INFO_FILE).unlink(missing_ok=True)
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name == BUILD_INFO_FILE):
                dest = target / entry.name
                if dest.is_dir():
                    shutil.rmtree(dest)
                os.replace(entry, dest)
    finally:
        torch.set_num_threads(threads)
    log(f"toy built in {time.time() - start:.0f}s -> {target}")


def build_toy_pipeline(
    output_dir: str | os.PathLike | None = None,
    force: bool = False,
    config: ToyTrainConfig | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Path of the pretrained toy pipeline directory (a standard `StableDiffusionPipeline`).

    Without `output_dir`: the committed `assets/toy` if its recorded code hash (and config) is current,
    else `<cache>/toy-<hash[:16]>`, built there on first use (~4 minutes on 2 cores). With `output_dir`:
    that directory, (re)built unless it already holds a current build. `force` always rebuilds.
    A non-default `config` gets its own cache entry.
    """
    code_hash = toy_code_hash()
    config = config or ToyTrainConfig()
    if output_dir is None:
        if not force and is_current_build(ASSETS_DIR, code_hash, config):
            return ASSETS_DIR
        key = code_hash[:16]
        if config != ToyTrainConfig():
            key += "-" + hashlib.sha256(json.dumps(_config_record(config)).encode()).hexdigest()[:8]
        target = cache_dir() / f"toy-{key}"
    else:
        target = Path(output_dir)
    if force or not is_current_build(target, code_hash, config):
        log(f"building the pretrained toy into {target} ...")
        _build_into(target, code_hash, config, log)
    return target


def committed_toy_is_current(log: Callable[[str], None] = print) -> bool:
    """The committed toy's cache key (training code, config) and the torch that built it match this checkout."""
    import torch

    info = read_build_info(ASSETS_DIR)
    if not is_current_build(ASSETS_DIR):
        log("the toy's training code or config changed since assets/toy was built")
        return False
    if info.get("torch") != torch.__version__:
        log(f"assets/toy was built with torch {info.get('torch')}, this is torch {torch.__version__}")
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m utils.toy", description="Build (or locate) the pretrained toy model.")
    p.add_argument("--output_dir", default=None,
                   help="Where to build it (default: the committed assets/toy if current, else the cache "
                        "$DRAFTPLUS_CACHE or ~/.cache/draftplus).")
    p.add_argument("--force", action="store_true", help="Rebuild even if a current build exists.")
    p.add_argument("--seed", type=int, default=TOY_SEED,
                   help="Training seed; another seed than the committed one's builds its own cache entry.")
    p.add_argument("--check", action="store_true",
                   help="Build nothing: exit 0 if the committed assets/toy was built by this code, config and torch\n"
                        "version (its cache key), else print why and exit 1 (CI then runs the rebuild test).")
    args = p.parse_args(argv)
    if args.check:
        raise SystemExit(0 if committed_toy_is_current(print) else 1)
    print(build_toy_pipeline(args.output_dir, force=args.force, config=ToyTrainConfig(seed=args.seed)))


if __name__ == "__main__":
    main()
