"""HPSv3 (Ma et al., ICCV 2025) on transformers 5's Qwen2-VL classes.

HPSv3's code (`hpsv3` 1.0, MizzenAI/HPSv3) pins transformers 4.45.2; its reward model is
`Qwen2VLRewardModelBT`, Qwen2-VL-7B-Instruct with a small MLP (`rm_head`) read at a special token:

    text   = chat template(user: [image], INSTRUCTION.format(prompt) + "...ratings of this image: <|Reward|>\\n\\nEND\\n")
    image  = qwen-vl-utils resize to exactly 256 merged patches' worth of pixels (min = max = 256*28*28)
    hidden = Qwen2-VL(text with the image's tokens scattered in)            [B, L, 3584], final RMSNorm
    (mu, sigma) = rm_head(hidden at <|Reward|>)  in fp32;   score = mu     (as `HPSv3RewardInferencer`)

* rm_head ("ranknet", no kwargs): Linear(3584, 1024) ReLU Dropout(0.05) Linear(1024, 16) ReLU
  Linear(16, 2), kept in fp32 (`model.rm_head.to(torch.float32)`).
* Positions: HPSv3's forward embeds the image itself and calls the *text* decoder with
  `position_ids=None`, so transformers 4.45 used plain positions 0..L-1 on all three M-RoPE axes, not
  Qwen2-VL's 3-D image positions (`get_rope_index`). The model was trained that way, so this port
  passes the same positions; transformers 5's `Qwen2VLModel.forward` would compute 3-D ones.
* `<|Reward|>` is added to Qwen2-VL's tokenizer (id 151657) and the embeddings are resized to the
  tokenizer (151658 rows, not the config's 152064); `HPSv3.safetensors` holds the whole model in
  transformers 4.45's names (`model.*`, `visual.*`, `lm_head.*`, `rm_head.*`). The LM head is never
  used and is not read.

`hpsv3_config()` gives the architecture from the published Qwen2-VL-7B-Instruct values (also with
reduced sizes, for tests) and `build_hpsv3_model(config)` the module, without loading weights: what a
memory estimator needs. The reward loads `MizzenAI/HPSv3` (or a local directory) on top of
`Qwen/Qwen2-VL-7B-Instruct` (config and tokenizer; or a local directory): safetensors, no remote code.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import check_inputs
from .errors import RewardLoadError, RewardSpecError
from .files import prefer_model_dir, resolve_model_files
from .loading import checkpoint_layers, hf_from_pretrained, resolve_dtype
from .qwen2vl_preprocess import Qwen2VLPreprocessConfig, qwen2vl_pixels
from .text_cache import TextCachedReward

HPSV3_MODEL = "MizzenAI/HPSv3"
HPSV3_BASE = "Qwen/Qwen2-VL-7B-Instruct"
CHECKPOINT_FILE = "HPSv3.safetensors"
BASE_CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")

#: HPSv3's pixel budget (`HPSRewardInferencer.prepare_batch`): every image becomes 256 merged patches.
PIXELS = 256 * 28 * 28
REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"
#: Tokens of Qwen2-VL-7B-Instruct's tokenizer (151657) plus `<|Reward|>`: the checkpoint's embedding rows.
HPSV3_VOCAB_SIZE = 151658
#: rm_head "ranknet" without kwargs: hidden -> 1024 -> 16 -> (mu, sigma).
HEAD_SIZES = (1024, 16, 2)
HEAD_DROPOUT = 0.05

# hpsv3/dataset/data_collator_qwen.py, verbatim: INSTRUCTION and prompt_with_special_token
# (`use_special_tokens: true` in HPSv3_7B.yaml).
# Trailing spaces included: they are part of the text the model was trained on.
INSTRUCTION = "\n".join(
    (
        '',
        'You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. ',
        '',
        '**Visual Quality:**  ',
        'Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:',
        '- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.',
        '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.',
        '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).',
        '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.',
        '- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. ',
        '',
        '**Text Alignment:**  ',
        'Assess how well the image matches the textual prompt across the following sub-dimensions:',
        '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.',
        '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.',
        '- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.',
        '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.',
        '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.',
        'Textual prompt - {text_prompt}',
        '',
        '',
        '',
    )
)
PROMPT_WITH_SPECIAL_TOKEN = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
# Qwen2-VL-7B-Instruct's chat template rendered for one user turn [image, text] with
# add_generation_prompt=True (the template adds the default system turn when there is none).
CHAT_PREFIX = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
)
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"

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


class HPSv3Reward(TextCachedReward):
    """HPSv3 on transformers' Qwen2-VL classes; the score is the head's mean mu.

    Args:
        model: hub id (default MizzenAI/HPSv3) or local directory holding `HPSv3.safetensors`.
        base: Qwen2-VL-7B-Instruct (hub id) or a local directory with its `config.json` and
            tokenizer; a local `model` directory holding its own config.json and tokenizer is used
            when this is left at its default.
        dtype: compute dtype of the backbone (the head stays fp32).
        device: where to load the model.
        gradient_checkpointing: checkpoint the layers of the vision tower and of the decoder (both
            carry gradients to the image: the decoder reads the image tokens).
        cache_size: how many prompts' token ids to keep (0 disables the cache).
    """

    name = "hpsv3"
    description = (
        "HPSv3 (Qwen2-VL-7B-Instruct + MLP at a <|Reward|> token, on transformers' Qwen2-VL): "
        "mean mu of the predicted score"
    )
    score_range = "unnormalised (mu on HPSv3's own scale)"
    file_options = ("model", "base")

    def __init__(
        self,
        model: str = HPSV3_MODEL,
        base: str = HPSV3_BASE,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
        cache_size: int = 1024,
    ) -> None:
        super().__init__(cache_size)
        self.compute_dtype = resolve_dtype(dtype)
        files = resolve_model_files(model, (CHECKPOINT_FILE,), "HPSv3")
        base_source = prefer_model_dir(model, base, HPSV3_BASE, (BASE_CONFIG_FILE,))
        base_files = resolve_model_files(base_source, (BASE_CONFIG_FILE,), "HPSv3's Qwen2-VL base")
        # The tokenizer first: it is cheap, and a wrong one should fail before 16 GB are read.
        self.tokenizer = self._load_tokenizer(str(base_source))
        self.model = load_hpsv3_model(files[CHECKPOINT_FILE], base_files[BASE_CONFIG_FILE], self.compute_dtype)
        self._check_token_ids()
        self.freeze()
        if device is not None:
            self.to(device)
        self.preprocess_config = Qwen2VLPreprocessConfig(min_pixels=PIXELS, max_pixels=PIXELS)
        if gradient_checkpointing:
            checkpoint_layers(self.model.backbone.visual.blocks)
            checkpoint_layers(self.model.backbone.language_model.layers)

    @classmethod
    def architecture_config(cls, **overrides: Any) -> Any:
        """The `Qwen2VLConfig` this reward builds at full size (Qwen2-VL-7B-Instruct, HPSv3's vocabulary);
        see `hpsv3_config` for `overrides`. With `build_hpsv3_model`, what a memory estimator needs."""
        return hpsv3_config(**overrides)

    @classmethod
    def build_module(cls, config: Any | None = None) -> HPSv3Model:
        """The full HPSv3 module (backbone + head) from `config`, no weights loaded (`build_hpsv3_model`)."""
        return build_hpsv3_model(config)

    @staticmethod
    def _load_tokenizer(source: str) -> Any:
        """Qwen2-VL's tokenizer plus `<|Reward|>`, as HPSv3's `create_model_and_processor`."""
        from transformers import AutoTokenizer

        tokenizer = hf_from_pretrained(AutoTokenizer, source, "HPSv3 tokenizer (Qwen2-VL's)")
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        return tokenizer

    def _check_token_ids(self) -> None:
        config = self.model.config
        rows = config.text_config.vocab_size
        if len(self.tokenizer) != rows:
            raise RewardLoadError(
                f"HPSv3 tokenizer has {len(self.tokenizer)} tokens with {REWARD_TOKEN}, but the checkpoint's "
                f"embedding has {rows} rows; pass base= the Qwen2-VL-7B-Instruct tokenizer"
            )
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD_TOKEN)
        if image_id != config.image_token_id:
            raise RewardLoadError(
                f"HPSv3 tokenizer's {IMAGE_PAD_TOKEN} is id {image_id}, the config's image_token_id {config.image_token_id}"
            )
        self.reward_token_id = int(self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
        self.image_token_id = int(image_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.tokenizer.eos_token_id)

    @staticmethod
    def message(prompt: str) -> str:
        """The chat text HPSv3 scores, with one `<|image_pad|>` standing for the image's tokens."""
        return CHAT_PREFIX + INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN + CHAT_SUFFIX

    def _encode_text(self, prompts: list[str]) -> Tensor:
        """Token ids of one prompt's message, `[1, L]` (lengths differ between prompts: one at a time)."""
        (prompt,) = prompts
        ids = self.tokenizer(self.message(prompt), add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)

    def token_batch(self, prompts: Sequence[str], image_tokens: int) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) `[B, L]`: each message with `image_tokens` image tokens,
        right-padded as HPSv3's processor call (`padding=True`, padding side right)."""
        rows = []
        for prompt in prompts:
            ids = self.text_cache.get_many([prompt], self._encode_text, self.device)[0]
            at = (ids == self.image_token_id).nonzero()
            if at.numel() != 1:
                raise ValueError(f"HPSv3 prompt must not contain {IMAGE_PAD_TOKEN}: {prompt[:60]!r}")
            k = int(at[0, 0])
            rows.append(torch.cat([ids[:k], ids.new_full((image_tokens,), self.image_token_id), ids[k + 1 :]]))
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long, device=self.device)
        attention_mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def score_pixels(self, pixel_values: Tensor, image_grid_thw: Tensor, prompts: Sequence[str]) -> Tensor:
        """(mu, sigma) `[B, 2]` float32 of Qwen2-VL `pixel_values` / `image_grid_thw` (differentiable)."""
        merge = self.model.config.vision_config.spatial_merge_size
        per_image = image_grid_thw.prod(-1) // merge**2
        if len(set(per_image.tolist())) != 1:
            raise ValueError("HPSv3 scores a batch of images of one size")
        input_ids, attention_mask = self.token_batch(prompts, int(per_image[0]))
        return self.model(
            input_ids, attention_mask, pixel_values.to(self.compute_dtype), image_grid_thw, self.reward_token_id
        )

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(images, prompts)
        pixel_values, grid = qwen2vl_pixels(images.to(self.device), self.preprocess_config, dtype=self.compute_dtype)
        return self.score_pixels(pixel_values, grid, prompts)[:, 0]
