"""Shared machinery of the transformers-CLIP rewards (PickScore, CLIP score, aesthetic).

One class loads a CLIP checkpoint plus its image processor and tokenizer through
`from_pretrained`, so a hub id and a local directory take the same code path (tests use
tiny random models saved to a temp dir). Images go through the differentiable copy of the
processor (`rewards.preprocess`); prompts are encoded once, without grad, and cached.

Where the processor and tokenizer come from: `processor=` / `tokenizer=` if given; otherwise a
local `model=` directory that carries its own (preprocessor_config.json / tokenizer files);
otherwise the reward's official default (PickScore: the LAION CLIP-H processor; CLIP and
aesthetic: the model's own repo). The tokenizer otherwise follows the processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import check_inputs
from .files import prefer_model_dir
from .loading import checkpoint_layers, hf_from_pretrained, pooled, resolve_dtype
from .preprocess import ImagePreprocessConfig, preprocess_images
from .text_cache import TextCachedReward

PROCESSOR_FILES = ("preprocessor_config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")


def load_image_preprocess(processor: str, what: str) -> ImagePreprocessConfig:
    """Read the image processor config at `processor` (hub id or directory)."""
    from transformers import AutoImageProcessor

    proc = hf_from_pretrained(AutoImageProcessor, processor, f"{what} image processor")
    return ImagePreprocessConfig.from_processor(proc)


def _load_vision_tower(cls: Any, model: str, what: str, dtype: torch.dtype) -> Any:
    """`CLIPVisionModelWithProjection` from a full CLIPModel checkpoint (or a vision-only one)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    config = hf_from_pretrained(AutoConfig, model, f"{what} config")
    if getattr(config, "model_type", None) == "clip":
        # The projection size lives on the top-level CLIPConfig; the vision sub-config's own
        # `projection_dim` is a default (512) unless the checkpoint happened to save it.
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        config = vision_config
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the dropped text-tower weights are expected, not a problem
    try:
        return hf_from_pretrained(cls, model, f"{what} vision model", config=config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)


class ContextTokenizer:
    """Stands in for a CLIP tokenizer where there are no tokenizer files (`from_architecture`): every prompt is
    a full context of `model_max_length` tokens, the most the text tower reads."""

    def __init__(self, model_max_length: int) -> None:
        self.model_max_length = model_max_length

    def __call__(self, prompts: Sequence[str], max_length: int | None = None, **_: Any) -> Any:
        from transformers import BatchEncoding

        shape = (len(prompts), min(max_length or self.model_max_length, self.model_max_length))
        return BatchEncoding({"input_ids": torch.ones(shape, dtype=torch.long),
                              "attention_mask": torch.ones(shape, dtype=torch.long)})


class CLIPFamilyReward(TextCachedReward):
    """Base for rewards built on `transformers.CLIPModel`; subclasses define `score`.

    Args:
        model: hub id or local directory of the CLIP checkpoint.
        processor: where the image processor (and, unless `tokenizer` is given, the tokenizer)
            lives; defaults to the model directory if it has one, else `default_processor`, else `model`.
        tokenizer: where the tokenizer lives; defaults to the model directory if it has one, else
            to the processor's location.
        dtype: compute dtype of the model (fp32 by default; "bf16"/"fp16" to save memory).
        device: where to load the model.
        gradient_checkpointing: checkpoint the vision transformer layers (saves activation
            memory for the backward pass through the reward).
        cache_size: how many prompt embeddings to keep (0 disables the cache).
    """

    needs_text = True
    what = "CLIP"
    file_options = ("model",)
    #: The official processor when it does not live with the model (None: the model's own repo).
    default_processor: str | None = None

    #: The published network's CLIPConfig arguments (`architecture`); None: not known to this class.
    architecture_config: dict[str, Any] | None = None

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        tokenizer: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
        cache_size: int = 1024,
    ) -> None:
        super().__init__(cache_size)
        from transformers import AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection

        self.model_id = str(model)
        self.compute_dtype = resolve_dtype(dtype)
        processor = prefer_model_dir(model, processor, self.default_processor, PROCESSOR_FILES) or str(model)
        tokenizer = prefer_model_dir(model, tokenizer, None, TOKENIZER_FILES) or processor
        self.preprocess_config = load_image_preprocess(processor, self.what)
        if self.needs_text:
            self.model = hf_from_pretrained(CLIPModel, model, f"{self.what} model", dtype=self.compute_dtype)
            self.tokenizer = hf_from_pretrained(AutoTokenizer, tokenizer, f"{self.what} tokenizer")
            vision = self.model.vision_model
        else:
            # Prompt-free rewards need only the image tower: half the memory of a full CLIPModel.
            self.model = _load_vision_tower(
                CLIPVisionModelWithProjection, model, self.what, self.compute_dtype
            )
            self.tokenizer = None
            vision = self.model.vision_model
        self.freeze()
        if device is not None:
            self.model.to(device)
        if gradient_checkpointing:
            checkpoint_layers(vision.encoder.layers)

    @classmethod
    def architecture(cls, **options: Any) -> Any | None:
        from transformers import CLIPConfig

        return None if cls.architecture_config is None else CLIPConfig(**cls.architecture_config)

    @classmethod
    def from_architecture(cls, config: Any, dtype: torch.dtype | None = None, gradient_checkpointing: bool = False,
                          **options: Any) -> CLIPFamilyReward:
        """The reward on a CLIPModel (or its image tower) built from `config`, CLIP's image processing (224 px,
        OpenAI mean and std: the processors of every CLIP reward here), and a full-context stand-in tokenizer."""
        from transformers import CLIPModel, CLIPVisionModelWithProjection

        reward = cls.__new__(cls)
        TextCachedReward.__init__(reward, int(options.get("cache_size", 1024)))
        reward.model_id = f"{cls.name} architecture"
        reward.compute_dtype = resolve_dtype(dtype)
        reward.preprocess_config = ImagePreprocessConfig()
        if cls.needs_text:
            reward.model = CLIPModel._from_config(config, dtype=reward.compute_dtype)
            reward.tokenizer = ContextTokenizer(config.text_config.max_position_embeddings)
        else:
            vision = config.vision_config
            vision.projection_dim = config.projection_dim
            reward.model = CLIPVisionModelWithProjection._from_config(vision, dtype=reward.compute_dtype)
            reward.tokenizer = None
        reward.freeze()
        if gradient_checkpointing:
            checkpoint_layers(reward.model.vision_model.encoder.layers)
        return reward

    # -- embeddings ---------------------------------------------------------------------------

    def pixel_values(self, images: Tensor) -> Tensor:
        return preprocess_images(images, self.preprocess_config, dtype=self.compute_dtype)

    def image_embeds(self, images: Tensor) -> Tensor:
        """L2-normalised projected image embeddings, fp32, differentiable w.r.t. `images`."""
        pixels = self.pixel_values(images.to(self.device))
        if self.needs_text:
            emb = pooled(self.model.get_image_features(pixel_values=pixels))
        else:
            emb = self.model(pixel_values=pixels).image_embeds
        return F.normalize(emb.float(), dim=-1)

    def _encode_text(self, prompts: list[str]) -> Tensor:
        assert self.tokenizer is not None
        max_length = min(
            int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings)
        )
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            emb = pooled(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
            )
        return F.normalize(emb.float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """L2-normalised projected text embeddings, fp32, cached per prompt, no grad."""
        return self.text_features(prompts)

    # -- scoring ------------------------------------------------------------------------------

    def score(self, image_embeds: Tensor, prompts: Sequence[str]) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(images, prompts)
        return self.score(self.image_embeds(images), prompts).float()
