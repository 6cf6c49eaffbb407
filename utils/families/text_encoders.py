"""A pipeline without its text encoders (`--precompute_prompt_embeddings`): loaded without them, or released once
the prompts are encoded. The trainer and the memory estimate share these."""

from __future__ import annotations

import gc
from typing import Any

import torch


def text_encoder_components(model_index: dict | None) -> dict[str, None]:
    """The pipeline's text encoder components (`model_index.json`) as `from_pretrained` kwargs that load none."""
    return {name: None for name in (model_index or {}) if name.startswith("text_encoder")}


def release_text_encoders(family: Any, device: torch.device) -> list[str]:
    """Take the text encoders out of the family's pipeline (their weights freed: nothing else holds them); the family
    then runs on `device` (its rollout's). Returns the components released."""
    names = [name for name, module in family.pipe.components.items()
             if module is not None and any(module is e for e in family.text_encoders)]
    for name in names:
        setattr(family.pipe, name, None)
    family.execution_device = device
    gc.collect()
    return names
