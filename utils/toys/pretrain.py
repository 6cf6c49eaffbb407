"""Pretraining of the toy: a small Stable Diffusion pipeline learns the coloured shapes of `utils.toys.data`.

`train_toy_pipeline` renders the data set, trains a VAE, then a UNet on its latents under a frozen, randomly
initialised CLIP text encoder; `save_toy_pipeline` writes the result as a standard diffusers directory.
Where it is built, cached and committed is `utils.toys.toy`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from utils.toys.data import (
    TOY_COLORS,
    TOY_RESOLUTION,
    TOY_SHAPES,
    TOY_VOCAB,
    sample_toy_dataset,
    toy_caption,
    toy_prompts,
)
from utils.toys.tiny_models import build_clip_tokenizer, clip_text_config, sd_ddim_scheduler

# The version of what a toy build produces, part of the toy's cache key (with its config). Bump it by hand
# whenever a change alters the built files for the same config: the data (utils/toys/data.py), the toy's
# tokenizer (its words, or `build_clip_tokenizer`), the modules' architecture, the scheduler
# (`sd_ddim_scheduler`), the training loops below or how `save_toy_pipeline` stores the result. A bump makes the
# committed assets/toy stale: rebuild it with `python -m utils.toys --output_dir assets/toy --force` and commit
# it. Comments, names and formatting can change freely.
TOY_VERSION = 1
TOY_SEED = 0
PROMPTS_FILE = "prompts.txt"


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


def untrained_toy_vae(block_out_channels: tuple[int, ...]) -> AutoencoderKL:
    """The toys' VAE: 32x32 images <-> (32 / 2^(blocks - 1))^2 x 4 latents."""
    return AutoencoderKL(
        sample_size=TOY_RESOLUTION,
        in_channels=3,
        out_channels=3,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        latent_channels=4,
        norm_num_groups=32,
        mid_block_add_attention=False,  # the toy images need none, and it costs a third of the VAE's time
    )


def untrained_toy_pipeline(cfg: ToyTrainConfig | None = None) -> StableDiffusionPipeline:
    """The toy's architecture, tokenizer and scheduler, freshly initialised (from torch's global RNG)."""
    cfg = cfg or ToyTrainConfig()
    tokenizer = build_clip_tokenizer(words=TOY_VOCAB)
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
    vae = untrained_toy_vae(cfg.vae_block_out_channels)
    # Frozen at its random init: random CLIP features still separate the captions (the UNet learns to read them).
    text_encoder = CLIPTextModel(clip_text_config(
        tokenizer, hidden_size=cfg.text_hidden_size, intermediate_size=4 * cfg.text_hidden_size,
        num_attention_heads=4, num_hidden_layers=2,
    ))
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=sd_ddim_scheduler(cfg.prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def cosine_lr(step: int, total: int, warmup: int = 50) -> float:
    """The toys' learning-rate factor: linear warm-up, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit(module: torch.nn.Module, loss_terms: Callable[[], dict[str, torch.Tensor]], *, name: str, steps: int,
        lr: float, weight_decay: float, log: Callable[[str], None], log_every: int = 100,
        max_grad_norm: float | None = None) -> None:
    """The toys' optimisation: `steps` AdamW steps under `cosine_lr` on `loss_terms()["loss"]` (a fresh batch per
    call), gradients clipped to `max_grad_norm` if given; every term is logged every `log_every` steps and at
    the last. Leaves `module` in eval mode."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    module.train()
    for step in range(steps):
        terms = loss_terms()
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            log(f"{name} step {step:4d}  " + "  ".join(f"{k} {v.item():.4f}" for k, v in terms.items()))
    module.eval()


def train_toy_vae(vae: AutoencoderKL, images: torch.Tensor, g: torch.Generator, log: Callable[[str], None], *,
                  steps: int, batch_size: int, lr: float, kl_weight: float, align_weight: float) -> None:
    """Reconstruction + small KL + latent alignment."""
    x_all = images * 2 - 1
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_channels = vae.config.latent_channels
    # Start with small posterior noise (log-variance bias -5): at the default 0 the decoder first sees
    # latents drowned in unit noise and reconstruction stalls until the KL gives way.
    with torch.no_grad():
        vae.quant_conv.bias[latent_channels:] -= 5.0  # quant_conv's outputs are (mean, logvar)

    def loss_terms() -> dict[str, torch.Tensor]:
        x = x_all[torch.randint(len(x_all), (batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        mse = (recon - x).pow(2).mean()
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
        # Tie latent channels 0-2 to the downsampled image: a smooth, image-like latent space is far easier
        # for a small UNet to learn in minutes than the arbitrary one a plain autoencoder finds.
        align = (posterior.mean[:, :3] - torch.nn.functional.avg_pool2d(x, scale)).pow(2).mean()
        return {"loss": mse + kl_weight * kl + align_weight * align, "mse": mse, "kl": kl, "align": align}

    fit(vae, loss_terms, name="vae", steps=steps, lr=lr, weight_decay=0.0, log=log)


class ToyDataConfig(Protocol):
    """What `toy_data_latents` reads of a toy's build config (both toys' configs have these fields)."""

    per_combination: int
    vae_steps: int
    vae_batch_size: int
    vae_lr: float
    vae_kl_weight: float
    vae_align_weight: float


def toy_data_latents(vae: AutoencoderKL, cfg: ToyDataConfig, g: torch.Generator,
                     log: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Render the toy data set and train `vae` on it (`cfg`'s data and vae_* fields); returns the data set's
    latents (posterior means, unscaled) and labels."""
    images, labels = sample_toy_dataset(cfg.per_combination, g)
    log(f"data: {len(images)} images {TOY_RESOLUTION}x{TOY_RESOLUTION}")
    train_toy_vae(vae, images, g, log, steps=cfg.vae_steps, batch_size=cfg.vae_batch_size, lr=cfg.vae_lr,
                  kl_weight=cfg.vae_kl_weight, align_weight=cfg.vae_align_weight)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(256)])
    return latents, labels


class ToyCaptions:
    """The captions of a labelled toy data set, as rows of a table of distinct captions: the toys' text encoders
    are frozen, so each distinct caption ("" + short + full) is encoded once."""

    def __init__(self, labels: torch.Tensor):
        colors = list(TOY_COLORS)
        full = [toy_caption(colors[c], TOY_SHAPES[s], colors[b]) for c, s, b in labels.tolist()]
        short = [toy_caption(colors[c], TOY_SHAPES[s]) for c, s, _ in labels.tolist()]
        self.table = [""] + sorted(set(full) | set(short))  # row 0: the empty caption
        index = {caption: i for i, caption in enumerate(self.table)}
        self.full = torch.tensor([index[c] for c in full])
        self.short = torch.tensor([index[c] for c in short])

    def draw(self, idx: torch.Tensor, g: torch.Generator, uncond_prob: float, short_prob: float) -> torch.Tensor:
        """Table rows for the images `idx`: empty with `uncond_prob` (so classifier-free guidance has an
        unconditional model), the short caption with `short_prob`, else the full one."""
        u = torch.rand(len(idx), generator=g)
        caption = torch.where(u < uncond_prob + short_prob, self.short[idx], self.full[idx])
        return torch.where(u < uncond_prob, 0, caption)


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
    captions = ToyCaptions(labels)
    embeddings = _encode_captions(text_encoder, tokenizer, captions.table)

    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if cfg.prediction_type == "epsilon":
        loss_weight = snr.clamp(max=cfg.min_snr_gamma) / snr  # min-SNR (eps-loss = x0-loss * snr)
    else:
        # v-prediction: at high noise eps ~ x_t is a near-identity the tiny UNet cannot fit precisely in
        # minutes, while v ~ -x0 is easy and is exactly where the caption matters. Min-SNR-style cap of the
        # (easy) low-noise steps; v-loss = x0-loss * (1 + snr).
        loss_weight = (cfg.min_snr_gamma / (1 + snr)).clamp(max=1.0)
    b = cfg.unet_batch_size

    def loss_terms() -> dict[str, torch.Tensor]:
        idx = torch.randint(len(latents), (b,), generator=g)
        caption = captions.draw(idx, g, uncond_prob=cfg.uncond_prob, short_prob=cfg.short_caption_prob)
        x0 = latents[idx]
        # Offset noise: without it SD's schedule can hardly move an image's mean colour (flat backgrounds).
        noise = torch.randn(x0.shape, generator=g) + cfg.offset_noise * torch.randn(b, x0.shape[1], 1, 1, generator=g)
        t = torch.randint(scheduler.config.num_train_timesteps, (b,), generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = noise if cfg.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = unet(x_t, t, embeddings[caption]).sample
        return {"loss": ((pred - target).pow(2).mean(dim=(1, 2, 3)) * loss_weight[t]).mean()}

    fit(unet, loss_terms, name="unet", steps=cfg.unet_steps, lr=cfg.unet_lr, weight_decay=1e-2, log=log,
        max_grad_norm=1.0)


def train_toy_pipeline(cfg: ToyTrainConfig | None = None, log: Callable[[str], None] = print) -> StableDiffusionPipeline:
    """Pretrain the toy from scratch: render the data set, train the VAE, then the UNet on its latents."""
    cfg = cfg or ToyTrainConfig()
    torch.manual_seed(cfg.seed)  # module initialisation
    g = torch.Generator().manual_seed(cfg.seed)  # data, batches, noise
    pipe = untrained_toy_pipeline(cfg)
    pipe.text_encoder.eval().requires_grad_(False)
    latents, labels = toy_data_latents(pipe.vae, cfg, g, log)
    # 1 / latent std, as SD's 0.18215; the std of the first 1024 latents, as every toy build has measured it.
    scaling = float(1.0 / latents[:1024].std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    log(f"latents {tuple(latents.shape[1:])}, scaling_factor {scaling:.4f}")
    _train_unet(pipe.unet, latents * scaling, labels, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, cfg, g, log)
    return pipe


def save_toy_pipeline(pipe: DiffusionPipeline, directory: Path) -> None:
    """save_pretrained, then the denoiser's (UNet or transformer) and VAE's weights stored as fp16 (half the size;
    diffusers loads them as fp32). Text encoders stay fp32: transformers would load fp16 weights as fp16 models."""
    from safetensors.torch import load_file, save_file

    pipe.save_pretrained(directory, safe_serialization=True)
    for sub in ("unet", "transformer", "vae"):
        for file in (directory / sub).glob("*.safetensors"):
            state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(file).items()}
            save_file(state, file, metadata={"format": "pt"})
    (directory / PROMPTS_FILE).write_text("\n".join(toy_prompts()) + "\n")
