"""A tiny random `ZImagePipeline` (Z-Image / Z-Image-Turbo), built offline from configs.

The shapes are those of diffusers' own Z-Image pipeline tests; the tokenizer is a real `Qwen2Tokenizer` (the
byte-level BPE Z-Image's Qwen3 text model ships) whose vocabulary is generated, with a chat template that
renders a single user turn as Qwen3's does (the pipeline wraps every prompt in it before tokenizing).
"""

from __future__ import annotations

import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from tokenizers import AddedToken
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from utils.toys.tiny_models import FLOW_VAE, FLUX_VAE_FACTORS, TINY_WORDS, _bytes_to_unicode, _saved, tiny_vae

# Z-Image-Turbo's scheduler config (its scheduler/scheduler_config.json): a static shift, no dynamic shifting.
Z_IMAGE_TURBO_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
# Qwen3's special tokens that a single-turn chat prompt uses; <|endoftext|> pads, as in Qwen's tokenizers.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template, reduced to what ZImagePipeline renders: user turns, the generation prompt, and the empty
# thinking block Qwen3 adds when thinking is switched off (the pipeline switches it on: no block).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def build_qwen_tokenizer(words: tuple[str, ...] = (*TINY_WORDS, "user", "assistant"),
                         model_max_length: int = 32768) -> Qwen2Tokenizer:
    """A real `Qwen2Tokenizer` whose vocabulary is generated: every byte symbol, one BPE merge chain per word in
    `words` (alone and after a space, as byte-level BPE sees words inside a sentence), Qwen3's chat tokens and its
    chat template; any text still tokenizes, byte by byte."""
    space = _bytes_to_unicode()[ord(" ")]
    vocab: dict[str, int] = {}
    for symbol in _bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        parts = list(word)
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in vocab:
                merges.append((parts[0], parts[1]))
                vocab[merged] = len(vocab)
            parts = [merged] + parts[2:]
        # The word inside a sentence: the space symbol joins the whole word, merged last.
        merges.append((space, word))
        vocab[space + word] = len(vocab)
    for special in QWEN_SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                               chat_template=QWEN3_CHAT_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # Whole tokens wherever they occur in a text, never split into bytes (as in Qwen's added_tokens).
    tokenizer.add_tokens([AddedToken(token, special=True) for token in QWEN_SPECIAL_TOKENS])
    return tokenizer


def build_random_z_image_pipeline(save_dir: str | os.PathLike | None = None, *, seed: int = 0,
                                  scheduler: dict | None = None, text_dim: int = 32) -> ZImagePipeline:
    """A tiny random `ZImagePipeline`: a Qwen3 text model (its second-to-last hidden states condition), a
    single-stream transformer with noise and context refiners, 2x2 patches, QK norm and 3-axis RoPE, FLUX.1's
    16-channel VAE kind (factor 2 here, so height and width must be multiples of 4), and Z-Image-Turbo's
    scheduler unless `scheduler` (a FlowMatchEulerDiscreteScheduler config) says otherwise."""
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                           cap_feat_dim=text_dim, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # the pad tokens are made with torch.empty: random memory (NaNs) otherwise
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler or Z_IMAGE_TURBO_SCHEDULER)),
        vae=tiny_vae(16, **FLOW_VAE, **FLUX_VAE_FACTORS).eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return _saved(pipe, save_dir)
