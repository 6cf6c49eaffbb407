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

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import check_inputs
from .errors import RewardLoadError
from .files import prefer_model_dir, resolve_model_files
from .hpsv3_model import (  # noqa: F401  (the architecture's names, re-exported for the reward's users)
    HEAD_SIZES,
    HPSV3_VOCAB_SIZE,
    QWEN2_VL_7B_INSTRUCT,
    REWARD_TOKEN,
    HPSv3Model,
    build_hpsv3_model,
    hpsv3_config,
    load_hpsv3_model,
    map_key,
)
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
IMAGE_PAD_TOKEN = "<|image_pad|>"

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
    def architecture(cls, **options: Any) -> Any:
        """For a memory estimate (`Reward.architecture`): Qwen2-VL-7B-Instruct with HPSv3's vocabulary, counted by
        its weights (15.5 GB in bf16); the head's 3.7M weights and the activations are not traced."""
        return hpsv3_config()

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
