"""ImageReward (Xu et al. 2023) ported onto transformers' BLIP classes.

The only distribution, `image-reward` 1.5, cannot run on transformers 5 (it imports removed
`transformers.modeling_utils` helpers, pins timm 0.6 and unpickles its checkpoint), but every layer
it needs exists in transformers: BLIP's ViT is `BlipVisionModel` and BLIP's BERT with
cross-attention ("med.py") is `BlipTextModel`. The score, as `ImageReward.score` computes it:

    image_embeds = ViT-L/16(preprocess(image))                    [B, 197, 1024], final LayerNorm
    hidden = BERT(tokens(prompt), cross-attending to image_embeds) bidirectional, no causal mask
    score = (MLP(hidden[:, 0]) - 0.16717362830052426) / 1.0333394966054072

* Vision: BLIP ViT-L/16 at 224 (`create_vit('large')`): width 1024, depth 24, 16 heads (64-d, as in
  every BLIP ViT), MLP 4096, exact GELU, fused qkv with bias, LayerNorm eps 1e-6 (timm's; the
  transformers default 1e-5 moves the score by ~1.5e-3). Width, depth, MLP and patch size are read
  from the checkpoint's shapes, so checkpoints of the same family load.
* Text: BERT-base from `med_config.json` (12 heads -- BlipTextConfig defaults to 8), cross-attention
  to the image in every layer. transformers builds the cross-attention layers only with
  `is_decoder=True` in the config, but the forward must run with `is_decoder=False`: BLIP's
  "multimodal" encoder mode is bidirectional (a causal mask moves the score by ~0.18).
* Token 0 is the ordinary [CLS] (id 101); ImageReward does not substitute [ENC] (that would move the
  score by ~1.3). Tokenizer: bert-base-uncased plus [DEC] and [ENC] (vocab 30524), padded to 35.
* Head: the LAION aesthetic predictor's purely linear MLP (`rewards.mlp_head`; the ReLUs are
  commented out in the original), applied in fp32.
* Preprocessing: torchvision Resize(224, bicubic) + CenterCrop(224) + CLIP mean/std (as hpsv2).

`ImageReward.pt` is a plain state dict, loaded with `torch.load(weights_only=True)`; `map_key`
names every key onto transformers' modules or drops it explicitly, and anything else is an error.
Only the token ids are cached per prompt: the text tower attends to the image, so it runs, with
gradients, for every image-prompt pair.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import check_inputs
from .errors import RewardLoadError
from .files import prefer_model_dir, resolve_model_files
from .loading import checkpoint_layers, hf_from_pretrained, load_state_dict_file, resolve_dtype
from .mlp_head import LINEAR_SIZES, LinearHead
from .preprocess import ImagePreprocessConfig, preprocess_images, torchvision_resize_crop
from .text_cache import TextCachedReward

IMAGEREWARD_MODEL = "THUDM/ImageReward"
IMAGEREWARD_TOKENIZER = "bert-base-uncased"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")

SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_LENGTH = 35
IMAGE_SIZE = 224

VIT_WIDTH = 1024
VIT_DEPTH = 24
VIT_MLP = 4096
VIT_PATCH = 16
VIT_HEAD_DIM = 64
VIT_LAYER_NORM_EPS = 1e-6

_VISUAL = "blip.visual_encoder."
_TEXT = "blip.text_encoder."
_HEAD = "mlp.layers."
#: Keys of ImageReward.pt the score does not use: the ITC projections, and BERT's position_ids
#: buffer (transformers rebuilds it as a non-persistent buffer).
DROPPED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
DROPPED_KEYS = frozenset({_TEXT + "embeddings.position_ids"})

_VISION_RENAMES = (
    (re.compile(r"^cls_token$"), "embeddings.class_embedding"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embedding"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embedding.\1"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.(weight|bias)$"), r"encoder.layers.\1.layer_norm1.\2"),
    (re.compile(r"^blocks\.(\d+)\.norm2\.(weight|bias)$"), r"encoder.layers.\1.layer_norm2.\2"),
    # Same fused layout: timm reshapes qkv to (3, heads, head_dim), as BlipAttention does.
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), r"encoder.layers.\1.self_attn.qkv.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), r"encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"^norm\.(weight|bias)$"), r"post_layernorm.\1"),
)
_HEAD_KEY = re.compile(r"^(\d+)\.(weight|bias)$")


def map_key(key: str) -> tuple[str, str] | None:
    """ImageReward.pt key -> (tower, transformers key) with tower in vision/text/head; None if dropped.

    Raises RewardLoadError for a key that is neither mapped nor dropped, so a checkpoint of another
    layout fails loudly instead of loading half its weights.
    """
    if key in DROPPED_KEYS or key.startswith(DROPPED_PREFIXES):
        return None
    if key.startswith(_VISUAL):
        rest = key[len(_VISUAL) :]
        for pattern, target in _VISION_RENAMES:
            if pattern.match(rest):
                return "vision", pattern.sub(target, rest)
    elif key.startswith(_TEXT):
        # BLIP's med.py is the BERT that BlipTextModel was ported from: the names are the same.
        return "text", key[len(_TEXT) :]
    elif key.startswith(_HEAD):
        match = _HEAD_KEY.match(key[len(_HEAD) :])
        if match and int(match.group(1)) in LINEAR_SIZES:
            return "head", f"layers.{key[len(_HEAD) :]}"
    raise RewardLoadError(
        f"unexpected key {key!r} in the ImageReward checkpoint (not an ImageReward.pt layout)"
    )


def split_state_dict(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """ImageReward.pt -> {"vision": ..., "text": ..., "head": ...} state dicts in transformers' names."""
    out: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "head": {}}
    for key, value in state.items():
        mapped = map_key(key)
        if mapped is not None:
            out[mapped[0]][mapped[1]] = value
    return out


def vision_config(
    width: int = VIT_WIDTH,
    depth: int = VIT_DEPTH,
    mlp: int = VIT_MLP,
    patch: int = VIT_PATCH,
    image_size: int = IMAGE_SIZE,
) -> Any:
    """`BlipVisionConfig` of BLIP's ViT (defaults: ViT-L/16 at 224, as ImageReward)."""
    from transformers import BlipVisionConfig

    if width % VIT_HEAD_DIM:
        raise RewardLoadError(
            f"ImageReward ViT width {width} is not a multiple of the {VIT_HEAD_DIM}-d heads"
        )
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=depth,
        num_attention_heads=width // VIT_HEAD_DIM,
        image_size=image_size,
        patch_size=patch,
        hidden_act="gelu",  # exact (erf) GELU, timm's nn.GELU
        layer_norm_eps=VIT_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )


def vision_config_from_state_dict(vision: dict[str, Tensor]) -> Any:
    """The ViT's dimensions read from its (mapped) weights; head size, eps and activation are fixed."""
    try:
        width = int(vision["embeddings.class_embedding"].shape[-1])
        patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
        positions = int(vision["embeddings.position_embedding"].shape[1])
        mlp = int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as exc:
        raise RewardLoadError(f"the ImageReward checkpoint has no {exc.args[0]!r} (after mapping)") from None
    depth = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise RewardLoadError(f"ImageReward position embedding of {positions} is not 1 + a square grid")
    return vision_config(width=width, depth=depth, mlp=mlp, patch=patch, image_size=grid * patch)


def text_config(med: dict[str, Any], encoder_width: int) -> Any:
    """`BlipTextConfig` from BLIP's `med_config.json`, cross-attending to `encoder_width`-d image tokens."""
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise RewardLoadError(
            "med_config.json must have add_cross_attention=true (ImageReward's text encoder)"
        )
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise RewardLoadError("med_config.json: only absolute position embeddings are supported")
    try:
        return BlipTextConfig(
            vocab_size=med["vocab_size"],
            hidden_size=med["hidden_size"],
            num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"],
            intermediate_size=med["intermediate_size"],
            hidden_act=med["hidden_act"],
            layer_norm_eps=med["layer_norm_eps"],
            max_position_embeddings=med["max_position_embeddings"],
            hidden_dropout_prob=med.get("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.1),
            pad_token_id=med.get("pad_token_id", 0),
            # [DEC], added right after bert-base-uncased's tokens (30522); unused by the score.
            bos_token_id=med["vocab_size"] - 2,
            # BLIP overrides med_config's encoder_width with the ViT's width.
            encoder_hidden_size=encoder_width,
            # Builds the cross-attention layers; the forward still passes is_decoder=False.
            is_decoder=True,
        )
    except KeyError as exc:
        raise RewardLoadError(f"med_config.json has no {exc.args[0]!r}") from None


def preprocess_config(size: int = IMAGE_SIZE) -> ImagePreprocessConfig:
    """ImageReward's `_transform(224)`: torchvision Resize(bicubic) + CenterCrop + CLIP mean/std."""
    return torchvision_resize_crop(size)


def _load_strict(module: nn.Module, state: dict[str, Tensor], what: str, source: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise RewardLoadError(f"{source!r} does not fit ImageReward's {what}: {detail[:300]}") from exc


class ImageRewardReward(TextCachedReward):
    """ImageReward v1.0 on transformers' BLIP classes.

    Args:
        model: hub id (default THUDM/ImageReward) or local directory holding `ImageReward.pt`
            and `med_config.json`.
        tokenizer: bert-base-uncased (hub id) or a local tokenizer directory; a local `model`
            directory with its own tokenizer files is used when this is left at its default.
            [DEC] and [ENC] are added as ImageReward does.
        dtype: compute dtype of both towers (the head stays fp32).
        device: where to load the model.
        gradient_checkpointing: checkpoint the layers of both towers (both carry gradients to the
            image: the text tower cross-attends to it).
        cache_size: how many prompts' token ids to keep (0 disables the cache).
    """

    name = "imagereward"
    description = (
        "ImageReward v1.0 (BLIP ViT-L/16 + cross-attention BERT + MLP, on transformers' BLIP): "
        "(MLP(h_cls) - 0.167) / 1.033"
    )
    score_range = "~-2 to 2 (normalised)"
    file_options = ("model",)

    def __init__(
        self,
        model: str = IMAGEREWARD_MODEL,
        tokenizer: str = IMAGEREWARD_TOKENIZER,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
        cache_size: int = 1024,
    ) -> None:
        super().__init__(cache_size)
        from transformers import BlipTextModel, BlipVisionModel
        from transformers.initialization import no_init_weights

        self.compute_dtype = resolve_dtype(dtype)
        files = resolve_model_files(model, (CHECKPOINT_FILE, MED_CONFIG_FILE), "ImageReward")
        try:
            med = json.loads(Path(files[MED_CONFIG_FILE]).read_text())
        except (OSError, ValueError) as exc:
            raise RewardLoadError(f"cannot read {str(files[MED_CONFIG_FILE])!r}: {exc}") from exc
        # The tokenizer first: it is cheap, and a wrong one should fail before 1.8 GB are read.
        self.tokenizer = self._load_tokenizer(
            prefer_model_dir(model, tokenizer, IMAGEREWARD_TOKENIZER, TOKENIZER_FILES), med.get("vocab_size")
        )
        parts = split_state_dict(load_state_dict_file(files[CHECKPOINT_FILE]))
        vision_cfg = vision_config_from_state_dict(parts["vision"])
        text_cfg = text_config(med, encoder_width=vision_cfg.hidden_size)
        # Every weight is overwritten by the checkpoint: skip the random init (seconds at ViT-L size).
        with no_init_weights():
            self.vision = BlipVisionModel(vision_cfg)
            self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.head = LinearHead(text_cfg.hidden_size)
        source = str(files[CHECKPOINT_FILE])
        _load_strict(self.vision, parts["vision"], "vision tower", source)
        _load_strict(self.text, parts["text"], "text encoder", source)
        _load_strict(self.head, parts["head"], "MLP head", source)
        self.vision.to(self.compute_dtype)
        self.text.to(self.compute_dtype)
        self.freeze()
        if device is not None:
            self.to(device)
        self.image_size = int(vision_cfg.image_size)
        self.preprocess_config = preprocess_config(self.image_size)
        if gradient_checkpointing:
            checkpoint_layers(self.vision.encoder.layers)
            checkpoint_layers(self.text.encoder.layer)

    @staticmethod
    def _load_tokenizer(source: str, vocab_size: int | None) -> Any:
        """bert-base-uncased (or a local copy) plus [DEC] and [ENC], as BLIP's `init_tokenizer`."""
        from transformers import BertTokenizer

        tokenizer = hf_from_pretrained(BertTokenizer, source, "ImageReward tokenizer")
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # no-ops when already there
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        # transformers 5 builds a BertTokenizer with a 5-token default vocabulary when it finds no
        # files (e.g. offline), instead of failing: the size check is what catches that.
        if len(tokenizer) != vocab_size:
            raise RewardLoadError(
                f"ImageReward tokenizer from {source!r} has {len(tokenizer)} tokens with [DEC] and [ENC], "
                f"but med_config.json's vocab_size is {vocab_size} (bert-base-uncased + 2); "
                "pass tokenizer=/local/dir holding bert-base-uncased's vocab.txt"
            )
        return tokenizer

    def _encode_text(self, prompts: list[str]) -> Tensor:
        """Token ids and attention mask per prompt, stacked as `[n, 2, 35]` (what ImageReward feeds BERT)."""
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        return torch.stack([tokens["input_ids"], tokens["attention_mask"]], dim=1)

    def score_pixels(self, pixel_values: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores of preprocessed `[B, 3, 224, 224]` pixels (differentiable), float32 `[B]`."""
        if tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            # BlipVisionEmbeddings would silently slice the position embeddings for smaller inputs.
            raise ValueError(
                f"ImageReward needs {self.image_size}x{self.image_size} pixels, got {tuple(pixel_values.shape[-2:])}"
            )
        image_embeds = self.vision(pixel_values=pixel_values.to(self.compute_dtype)).last_hidden_state
        tokens = self.text_features(prompts)
        # encoder_attention_mask stays None: ImageReward passes all ones (every image token attended).
        hidden = self.text(
            input_ids=tokens[:, 0],
            attention_mask=tokens[:, 1],
            encoder_hidden_states=image_embeds,
            is_decoder=False,
        ).last_hidden_state
        raw = self.head(hidden[:, 0].float())[:, 0]
        return (raw - SCORE_MEAN) / SCORE_STD

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(images, prompts)
        pixels = preprocess_images(images.to(self.device), self.preprocess_config, dtype=self.compute_dtype)
        return self.score_pixels(pixels, prompts)
