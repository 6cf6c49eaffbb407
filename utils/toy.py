"""Tiny Stable Diffusion pipelines built offline: random ones for tests, a pretrained toy for demos.

Everything here is built from configs and a generated vocabulary, so it needs no model hub.
The output is a standard diffusers `StableDiffusionPipeline` directory, so the trainer,
`pipe.load_lora_weights(...)` and every other diffusers tool treat it like a real checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(
            vocab=str(directory / "vocab.json"),
            merges=str(directory / "merges.txt"),
            model_max_length=model_max_length,
        )
        if save_dir is not None:
            tokenizer.save_pretrained(directory)
    return tokenizer


def build_random_components(
    seed: int = 0,
    sample_size: int = 16,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    model_max_length: int = 77,
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
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=sample_size * 2,
        norm_num_groups=32,
    )
    tokenizer = build_clip_tokenizer(model_max_length=model_max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=cross_attention_dim,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=model_max_length,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
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
