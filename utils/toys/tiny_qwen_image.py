"""A tiny random `QwenImagePipeline` built offline: a Qwen2.5-VL text encoder from a config, a byte-level BPE
tokenizer whose vocabulary is generated, the Qwen-Image VAE (its latents_mean/std normalisation) and transformer
at toy widths, and the scheduler config Qwen-Image ships.

The tokenizer matters beyond "any text tokenizes": `QwenImagePipeline` wraps each prompt in a chat template and
drops the template's first 34 tokens (`prompt_template_encode_start_idx`), the count Qwen's own tokenizer gives
it. The generated vocabulary has the template's words as whole tokens, so the tiny tokenizer gives the same 34
and the transformer sees the prompt's tokens (and the template's tail), as with the real model.
"""

from __future__ import annotations

import os
import re

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from utils.toys.tiny_models import TINY_WORDS, _bytes_to_unicode, _saved

# Qwen/Qwen-Image's scheduler/scheduler_config.json: the dynamic shift over up to 8192 packed tokens, sigmas
# stretched to end at 0.02 before the final 0.
QWEN_IMAGE_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
                        "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential",
                        "use_dynamic_shifting": True}
# QwenImagePipeline's prompt template (set in its __init__; a test checks this copy against a built pipeline).
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen2's pad/eos and the chat markers


def build_qwen_tokenizer(words: tuple[str, ...] = TINY_WORDS) -> Qwen2Tokenizer:
    """A real `Qwen2Tokenizer` (byte-level BPE) with a generated vocabulary: every byte symbol, one merge chain
    per word of QwenImagePipeline's prompt template and of `words` (with and without the leading space, as
    Qwen2's pre-tokenizer cuts words), and the chat markers as special tokens. The template's space-led words
    rank first, so no other word's merge splits them."""
    byte = _bytes_to_unicode()
    space = byte[ord(" ")]
    template = re.sub(r"<\|[a-z_]+\|>", "\n", PROMPT_TEMPLATE)
    pieces = [p.replace(" ", space) for p in re.findall(r" ?[A-Za-z]+", template)]
    pieces += [space + w for w in words] + list(words)
    vocab = {symbol: i for i, symbol in enumerate(byte.values())}
    merges: list[tuple[str, str]] = []
    for piece in dict.fromkeys(pieces):
        parts = list(piece)
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in vocab:
                merges.append((parts[0], parts[1]))
                vocab[merged] = len(vocab)
            parts = [merged] + parts[2:]
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    return tokenizer


def tiny_qwen_text_encoder(tokenizer: Qwen2Tokenizer, hidden_size: int) -> Qwen2_5_VLForConditionalGeneration:
    """A 2-layer Qwen2.5-VL (its multimodal RoPE split 2:3:3 over half the head dim, as the real 16:24:24) with a
    tiny vision tower that text-to-image never calls."""
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden_size, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden_size},
        vocab_size=len(tokenizer), hidden_size=hidden_size, bos_token_id=None,  # Qwen2 prepends no BOS
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_random_qwen_image_pipeline(save_dir: str | os.PathLike | None = None, *, seed: int = 0,
                                     text_dim: int = 32) -> QwenImagePipeline:
    """A tiny random `QwenImagePipeline` shaped like Qwen-Image where it matters: 16 latent channels with the
    real VAE's latents_mean/std, 2x2-packed latents (transformer in_channels 64), double-stream blocks with a
    text mask and 3-axis RoPE, no guidance embedding (true CFG only), Qwen-Image's scheduler config.

    The VAE has factor 4 (two spatial downsamples) and latents are 2x2-packed: height and width must be multiples
    of 8 (the real model: 16); pass them explicitly (the pipeline's default size is 128 x vae_scale_factor)."""
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2,
                                              joint_attention_dim=text_dim, guidance_embeds=False,
                                              axes_dims_rope=(8, 4, 4))  # the axes' sum is the head dim
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True])  # the real latents_mean/std: the defaults
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae.eval(),
                             text_encoder=tiny_qwen_text_encoder(tokenizer, text_dim).eval(), tokenizer=tokenizer,
                             transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return _saved(pipe, save_dir)
