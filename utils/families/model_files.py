"""A model's files without its weights: which built-in toy or directory a name means, its `model_index.json`
and denoiser config (local, hub cache, or a small download), and so which family serves it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from utils.families.base import ModelFamily, UnsupportedModelError, family_for_class_name
from utils.toys.toy import TOYS


def _read_model_json(name_or_path: str, relative: str, revision: str | None, local_only: bool,
                     download: Callable[[str], dict]) -> dict | None:
    """The JSON file `relative` of a model: a toy's committed copy, a local directory's file, or a hub id's from the
    hub cache (`local_only`) or `download(name_or_path)`. None when a local directory lacks it, or the cache does."""
    path = str(TOYS[name_or_path].assets_dir) if name_or_path in TOYS else name_or_path
    local = Path(path) / relative
    if local.is_file():
        return json.loads(local.read_text())
    if os.path.isdir(path):
        return None
    if local_only:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, relative, revision=revision)
        return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None
    return download(path)


def read_model_index(name_or_path: str, revision: str | None = None, local_only: bool = False) -> dict | None:
    """`model_index.json` of a local directory or a hub id (from the hub cache when `local_only`).
    None when it cannot be read without a download (and `local_only`).

    A toy's is read from its committed copy (assets/toy, assets/toy-flow), there whether or not its weights are
    current: asking which family and sampler a toy has (the argument checks do) must not build or train it; that
    happens when its weights load."""

    def download(path: str) -> dict:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(path, revision=revision)

    return _read_model_json(name_or_path, "model_index.json", revision, local_only, download)


def read_denoiser_config(name_or_path: str, revision: str | None = None, local_only: bool = False) -> dict | None:
    """The denoiser's `config.json` (`unet/` or `transformer/`, as the model's family names it), read as
    `read_model_index` reads the index: no weights. The argument checks take the LoRA presets, the rollout
    defaults and the resume fingerprint from it. None when the model's family is unknown or the file cannot
    be read without a download (and `local_only`)."""
    index = read_model_index(name_or_path, revision, local_only)
    if index is None:
        return None
    try:
        family = family_for_class_name(index.get('_class_name', '?'))
    except UnsupportedModelError:
        return None
    relative = f"{family.denoiser_name}/config.json"

    def download(path: str) -> dict:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, relative, revision=revision)).read_text())

    config = _read_model_json(name_or_path, relative, revision, local_only, download)
    return None if config is None else family.denoiser_config_with(config, index)



def family_of(name_or_path: str, revision: str | None = None) -> type[ModelFamily]:
    """The family of a local pipeline directory, a hub id, or `toy`."""
    index = read_model_index(name_or_path, revision)
    if index is None or "_class_name" not in index:
        raise UnsupportedModelError(f"{name_or_path!r} is not a diffusers pipeline (no model_index.json)")
    return family_for_class_name(index["_class_name"])


def load_family(name_or_path: str, **kwargs) -> ModelFamily:
    """Pick the family from `model_index.json` and load the pipeline (see `ModelFamily.load`)."""
    return family_of(name_or_path, kwargs.get("revision")).load(name_or_path, **kwargs)


def family_of_lora_file(lora_file: str | os.PathLike) -> type[ModelFamily]:
    """The family whose LoRA files look like `lora_file` (every key under its denoiser's component, `unet.` or
    `transformer.`); of several such families, the first registered. For the exports, which families of one
    denoiser component share; give the model (`family_of`) where it is known."""
    from safetensors import safe_open

    from utils.families.base import FAMILIES

    with safe_open(str(lora_file), framework="pt") as f:
        keys = list(f.keys())
    for family in FAMILIES:
        if keys and all(k.startswith(family.denoiser_name + ".") for k in keys):
            return family
    raise UnsupportedModelError(f"{lora_file} is not a draftplus LoRA (its keys name no denoiser component)")
