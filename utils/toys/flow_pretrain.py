"""Pretraining of the flow toy: a small Stable Diffusion 3 pipeline learns the coloured shapes of `utils.toys.data`
with the rectified-flow objective.

The data, the VAE and its training, the frozen random CLIP text encoders and the caption dropout are the UNet
toy's (`utils.toys.pretrain`); the denoiser is an MMDiT (`SD3Transformer2DModel`) trained as SD3 is:
x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0, sigma logit-normal. Where it is built, cached and
committed is `utils.toys.toy`'s job.

SD3 reads its prompt three times: per-token features of two CLIPs and of T5, concatenated along the sequence,
and the two CLIPs' pooled features, which modulate every block (the pathway colour is learnt through, as the
UNet toy's pooled text embedding). The toy's T5 is muted (its final norm's weight is 0, so its features are
exactly 0: what SD3 sees when T5 is dropped with `text_encoder_3=None`): the directory loads like any SD3
checkpoint, without paying for T5 tokens a toy does not need. The pipeline still appends
`max_sequence_length` (default 256) such zero tokens to the text. Training shows the transformer any number of
them, from 1 to `max_zero_tokens`, at the cost of one (`ZeroTokensAttention`), so its images do not depend on
`max_sequence_length`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from transformers import CLIPTextModelWithProjection

from utils.toys.data import TOY_RESOLUTION, TOY_VOCAB
from utils.toys.pretrain import (
    TOY_SEED,
    ToyCaptions,
    ToyTrainConfig,
    fit,
    toy_data_latents,
    untrained_toy_vae,
)
from utils.toys.tiny_models import build_clip_tokenizer, build_t5_tokenizer, clip_text_config, tiny_t5_encoder

# The version of what a flow-toy build produces, part of its cache key (with its config). Bump it by hand whenever
# a change alters the built files for the same config: this module, or what it shares with the UNet toy (the data,
# the tokenizers, `untrained_toy_vae`, `toy_data_latents`, `ToyCaptions`, `fit`, `save_toy_pipeline`; such a change bumps
# TOY_VERSION too). A bump makes the committed assets/toy-flow stale: rebuild it with
# `python -m utils.toys --toy toy-flow --output_dir assets/toy-flow --force` and commit it.
FLOW_TOY_VERSION = 1
UNET_TOY = ToyTrainConfig()  # what the flow toy trains as the UNet toy does


@dataclass(frozen=True)
class FlowToyTrainConfig:
    """Every knob of the flow toy's build. The defaults take ~3 minutes (on one thread: see `utils.toys.toy`)."""

    seed: int = TOY_SEED
    per_combination: int = UNET_TOY.per_combination
    vae_block_out_channels: tuple[int, ...] = UNET_TOY.vae_block_out_channels  # 32x32 images <-> 8x8x4 latents
    vae_steps: int = UNET_TOY.vae_steps
    vae_batch_size: int = UNET_TOY.vae_batch_size
    vae_lr: float = UNET_TOY.vae_lr
    vae_kl_weight: float = UNET_TOY.vae_kl_weight
    vae_align_weight: float = UNET_TOY.vae_align_weight
    text_hidden_size: int = UNET_TOY.text_hidden_size  # each CLIP's; T5's (muted) is both together
    text_max_length: int = 16  # CLIP tokens: a toy caption has at most 9; every one costs compute
    patch_size: int = 2  # 8x8 latents -> 16 image tokens
    num_layers: int = 3
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    scheduler_shift: float = 1.0  # SD3's 3.0 is for 128x128 latents; these are 8x8
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    logit_mean: float = 0.0  # sigma = sigmoid(N(mean, std)), SD3's logit-normal sampling
    logit_std: float = 1.0
    max_zero_tokens: int = 512  # the longest T5 text FLUX and SD3 take
    uncond_prob: float = UNET_TOY.uncond_prob
    short_caption_prob: float = UNET_TOY.short_caption_prob


def untrained_flow_toy_pipeline(cfg: FlowToyTrainConfig | None = None) -> StableDiffusion3Pipeline:
    """The flow toy's architecture, tokenizers and scheduler, freshly initialised (from torch's global RNG)."""
    cfg = cfg or FlowToyTrainConfig()
    tokenizer = build_clip_tokenizer(words=TOY_VOCAB, model_max_length=cfg.text_max_length)
    t5_tokenizer = build_t5_tokenizer(words=TOY_VOCAB)
    width = cfg.text_hidden_size

    def clip() -> CLIPTextModelWithProjection:
        # Frozen at its random init, as the UNet toy's: random CLIP features still separate the captions.
        return CLIPTextModelWithProjection(clip_text_config(
            tokenizer, hidden_size=width, intermediate_size=4 * width, num_attention_heads=4, num_hidden_layers=2,
            projection_dim=width,
        ))

    text_encoder, text_encoder_2 = clip(), clip()
    t5 = tiny_t5_encoder(t5_tokenizer, d_model=2 * width)  # as wide as both CLIPs: the pipeline pads them to it
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.zero_()  # muted: exactly zero features, whatever the prompt
    vae = untrained_toy_vae(cfg.vae_block_out_channels)
    latent_size = TOY_RESOLUTION // 2 ** (len(cfg.vae_block_out_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=cfg.patch_size,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=2 * width,
        caption_projection_dim=cfg.num_attention_heads * cfg.attention_head_dim,
        pooled_projection_dim=2 * width,
        pos_embed_max_size=4 * latent_size // cfg.patch_size,  # images up to 4x the training size
        qk_norm="rms_norm",  # as SD3.5
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.scheduler_shift), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


class ZeroTokensAttention:
    """SD3's joint attention (diffusers' `JointAttnProcessor2_0`) where the text's last token stands for
    `counts[i]` identical copies of itself in sample i: a bias log(count) on its attention logits is exactly
    the attention over that many copies (identical tokens get identical keys, values and outputs). For
    training only: the saved transformer keeps diffusers' stock processor."""

    def __init__(self) -> None:
        self.log_counts = torch.zeros(1)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        text_query, text_key, text_value = (
            heads(proj(encoder_hidden_states)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.norm_added_q is not None:
            text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        query, key, value = (torch.cat(pair, dim=2) for pair in
                             ((query, text_query), (key, text_key), (value, text_value)))
        bias = torch.zeros(batch, 1, 1, key.shape[2], dtype=query.dtype, device=query.device)
        bias[:, 0, 0, -1] = self.log_counts
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1])
        image, text = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


def _train_transformer(
    pipe: StableDiffusion3Pipeline,
    latents: torch.Tensor,
    labels: torch.Tensor,
    cfg: FlowToyTrainConfig,
    g: torch.Generator,
    log: Callable[[str], None],
) -> None:
    """Rectified flow on SD3's logit-normal sigmas, with caption dropout (for classifier-free guidance)."""
    captions = ToyCaptions(labels)
    with torch.no_grad():
        # One zero T5 token per caption (T5 is muted, so its prompt does not matter: "" is one token), which
        # `ZeroTokensAttention` repeats.
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions.table, prompt_2=None, prompt_3=[""] * len(captions.table), do_classifier_free_guidance=False,
            max_sequence_length=1)
    transformer = pipe.transformer
    stock_processors = transformer.attn_processors
    zero_tokens = ZeroTokensAttention()
    transformer.set_attn_processor(zero_tokens)
    b = cfg.batch_size

    def loss_terms() -> dict[str, torch.Tensor]:
        idx = torch.randint(len(latents), (b,), generator=g)
        caption = captions.draw(idx, g, uncond_prob=cfg.uncond_prob, short_prob=cfg.short_caption_prob)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        sigma = compute_density_for_timestep_sampling(
            "logit_normal", b, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, generator=g)
        zero_tokens.log_counts = torch.rand(b, generator=g) * math.log(cfg.max_zero_tokens)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        v = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=embeds[caption],
                        pooled_projections=pooled[caption], return_dict=False)[0]
        return {"loss": (v - (noise - x0)).pow(2).mean()}

    fit(transformer, loss_terms, name="transformer", steps=cfg.steps, lr=cfg.lr, weight_decay=1e-2, log=log,
        log_every=500, max_grad_norm=1.0)
    transformer.set_attn_processor(stock_processors)


def train_flow_toy_pipeline(cfg: FlowToyTrainConfig | None = None,
                            log: Callable[[str], None] = print) -> StableDiffusion3Pipeline:
    """Pretrain the flow toy from scratch: render the data set, train the VAE, then the transformer on its latents."""
    cfg = cfg or FlowToyTrainConfig()
    torch.manual_seed(cfg.seed)  # module initialisation
    g = torch.Generator().manual_seed(cfg.seed)  # data, batches, noise
    pipe = untrained_flow_toy_pipeline(cfg)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        encoder.eval().requires_grad_(False)
    latents, labels = toy_data_latents(pipe.vae, cfg, g, log)
    # SD3 normalises latents as (z - shift_factor) * scaling_factor: zero mean, unit variance here.
    shift, scaling = latents.mean().item(), 1.0 / latents.std().item()
    pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    log(f"latents {tuple(latents.shape[1:])}, shift_factor {shift:.4f}, scaling_factor {scaling:.4f}")
    _train_transformer(pipe, (latents - shift) * scaling, labels, cfg, g, log)
    return pipe
