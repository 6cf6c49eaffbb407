"""HPSv3's model without its reward logic: the Qwen2-VL-7B-Instruct architecture from its published config
(`hpsv3_config`, also with reduced sizes for tests), the module with its rank head (`build_hpsv3_model`,
no weights: what a memory estimator builds under fake tensors), and loading `HPSv3.safetensors` into it
(transformers 4.45's key names mapped onto transformers 5's). `rewards.hpsv3` scores images with it."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RewardLoadError, RewardSpecError

REWARD_TOKEN = "<|Reward|>"  # the token the head reads the hidden state at
#: Tokens of Qwen2-VL-7B-Instruct's tokenizer (151657) plus `<|Reward|>`: the checkpoint's embedding rows.
HPSV3_VOCAB_SIZE = 151658
#: rm_head "ranknet" without kwargs: hidden -> 1024 -> 16 -> (mu, sigma).
HEAD_SIZES = (1024, 16, 2)
HEAD_DROPOUT = 0.05


# Qwen/Qwen2-VL-7B-Instruct's config.json (the values that shape the model), as published.
QWEN2_VL_7B_INSTRUCT: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "use_sliding_window": False,
    "sliding_window": 32768,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_channels": 3,
        "hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}


def hpsv3_config(vocab_size: int = HPSV3_VOCAB_SIZE, **overrides: Any) -> Any:
    """The `Qwen2VLConfig` of HPSv3's backbone: Qwen2-VL-7B-Instruct with HPSv3's resized vocabulary.

    `overrides` replace published values (flat text keys such as `hidden_size`, `num_hidden_layers`,
    `image_token_id`); `vision_config={...}` updates vision keys one by one. Tests call this with
    reduced sizes; the memory estimator with none.
    """
    from transformers import Qwen2VLConfig

    values = copy.deepcopy(QWEN2_VL_7B_INSTRUCT)
    values["vocab_size"] = vocab_size
    unknown = set(overrides) - set(values) - {"pad_token_id"}
    if unknown:
        raise RewardSpecError(f"hpsv3_config: unknown keys {sorted(unknown)}")
    vision = overrides.pop("vision_config", None) or {}
    unknown = set(vision) - set(values["vision_config"])
    if unknown:
        raise RewardSpecError(f"hpsv3_config: unknown vision_config keys {sorted(unknown)}")
    values["vision_config"].update(vision)
    values.update(overrides)
    config = Qwen2VLConfig(**values)
    # SDPA: exact on CPU and GPU alike, and what HPSv3 falls back to without flash-attn.
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


def rank_head(hidden_size: int) -> nn.Sequential:
    """HPSv3's `rm_head` ("ranknet" without kwargs); same module indices, so the keys load as they are."""
    h1, h2, out = HEAD_SIZES
    return nn.Sequential(
        nn.Linear(hidden_size, h1), nn.ReLU(), nn.Dropout(HEAD_DROPOUT), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, out)
    )


class HPSv3Model(nn.Module):
    """Qwen2-VL (vision tower + text decoder, no LM head) and HPSv3's head: `forward -> [B, 2]` (mu, sigma)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import Qwen2VLModel

        self.config = config
        self.backbone = Qwen2VLModel(config)
        self.head = rank_head(config.text_config.hidden_size).float()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        image_grid_thw: Tensor,
        reward_token_id: int,
    ) -> Tensor:
        backbone = self.backbone
        embeds = backbone.language_model.embed_tokens(input_ids)
        image_embeds = backbone.visual(pixel_values.to(backbone.visual.dtype), grid_thw=image_grid_thw).pooler_output
        image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        if int(image_mask[..., 0].sum()) != image_embeds.shape[0]:
            raise ValueError(
                f"HPSv3: {int(image_mask[..., 0].sum())} image tokens for {image_embeds.shape[0]} image features"
            )
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        # Positions 0..L-1 on all three M-RoPE axes, as HPSv3's forward gets from transformers 4.45's
        # text decoder (it passes position_ids=None there); see the module docstring.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        positions = positions.view(1, 1, -1).expand(3, input_ids.shape[0], -1)
        hidden = backbone.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False
        ).last_hidden_state
        is_reward = input_ids == reward_token_id
        if not bool(is_reward.any(dim=1).all()):
            raise ValueError(f"HPSv3: a sequence has no {REWARD_TOKEN} token")
        # The first <|Reward|> of each sequence (the template has exactly one).
        index = is_reward.int().argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        return self.head(pooled.float())


def build_hpsv3_model(config: Any | None = None) -> HPSv3Model:
    """HPSv3's full module (Qwen2-VL backbone + head) from `config` (default `hpsv3_config()`), weights
    not loaded: random under a normal device, free under `torch.device("meta")` or FakeTensorMode."""
    return HPSv3Model(hpsv3_config() if config is None else config)


# ---------------------------------------------------------------- checkpoint keys

_KEY_RULES = (
    # transformers 4.45 (HPSv3's pin) and transformers >= 4.52 layouts of Qwen2VLForConditionalGeneration.
    (re.compile(r"^model\.language_model\.(.+)$"), r"backbone.language_model.\1"),
    (re.compile(r"^model\.visual\.(.+)$"), r"backbone.visual.\1"),
    (re.compile(r"^model\.(embed_tokens|layers|norm)(\..+)$"), r"backbone.language_model.\1\2"),
    (re.compile(r"^visual\.(.+)$"), r"backbone.visual.\1"),
    (re.compile(r"^rm_head\.(.+)$"), r"head.\1"),
)
#: The LM head (next-token logits): HPSv3's score never reads it.
DROPPED_KEYS = frozenset({"lm_head.weight"})


def map_key(key: str) -> str | None:
    """HPSv3.safetensors key -> `HPSv3Model` key; None for a key the score does not use.

    Anything else is a RewardLoadError: a checkpoint of another layout fails instead of half-loading.
    """
    if key in DROPPED_KEYS:
        return None
    for pattern, target in _KEY_RULES:
        if pattern.match(key):
            return pattern.sub(target, key)
    raise RewardLoadError(f"unexpected key {key!r} in the HPSv3 checkpoint (not an HPSv3.safetensors layout)")


def _read_checkpoint(path: Path, dtype: torch.dtype) -> dict[str, Tensor]:
    """The used tensors of `path` in HPSv3Model's names, backbone in `dtype`, head in fp32.

    Reads tensor by tensor (safe_open), so the unused 0.5B-parameter LM head is never loaded.
    """
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise RewardLoadError(f"HPSv3 weights must be a .safetensors file, got {str(path)!r}")
    state: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                target = map_key(key)
                if target is not None:
                    tensor = handle.get_tensor(key)
                    state[target] = tensor.float() if target.startswith("head.") else tensor.to(dtype)
    except RewardLoadError:
        raise
    except Exception as exc:
        raise RewardLoadError(f"cannot read {str(path)!r} ({type(exc).__name__}: {exc})") from exc
    return state


def _backbone_config(base_config: Path, state: dict[str, Tensor]) -> Any:
    """The base model's config.json, with the vocabulary the checkpoint's embedding has."""
    from transformers import Qwen2VLConfig

    try:
        config = Qwen2VLConfig.from_json_file(str(base_config))
    except Exception as exc:
        raise RewardLoadError(f"cannot read the Qwen2-VL config {str(base_config)!r}: {exc}") from exc
    embed = state.get("backbone.language_model.embed_tokens.weight")
    if embed is None:
        raise RewardLoadError("the HPSv3 checkpoint has no token embedding (model.embed_tokens.weight)")
    config.text_config.vocab_size = int(embed.shape[0])
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


def load_hpsv3_model(checkpoint: Path, base_config: Path, dtype: torch.dtype) -> HPSv3Model:
    """HPSv3Model with the checkpoint's weights: built on the meta device and filled by assignment,
    so a 7B model costs its weights once (in `dtype`), not a random init first."""
    state = _read_checkpoint(checkpoint, dtype)
    config = _backbone_config(base_config, state)
    with torch.device("meta"):
        model = HPSv3Model(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise RewardLoadError(f"{str(checkpoint)!r} does not fit HPSv3 on this base config: {detail[:300]}") from exc
    # Non-persistent buffers (the rotary inverse frequencies) are not in any checkpoint: rebuild those
    # modules for real, then cast like the original (`model.to(bf16)` casts buffers too).
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLRotaryEmbedding,
        Qwen2VLVisionRotaryEmbedding,
    )

    model.backbone.language_model.rotary_emb = Qwen2VLRotaryEmbedding(config=config.text_config)
    model.backbone.visual.rotary_pos_emb = Qwen2VLVisionRotaryEmbedding(config.vision_config)
    model.backbone.to(dtype)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RewardLoadError(f"HPSv3: {len(left)} tensors were not loaded (first: {left[0]})")
    return model


# ---------------------------------------------------------------- the reward


