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


def read_native_size(name_or_path: str, family: type[ModelFamily], denoiser_config: dict | None,
                     revision: str | None = None, local_only: bool = False) -> int | None:
    """The model's native image side (`ModelFamily.native_size`) from its denoiser and VAE configs, no weights;
    None where they cannot be read."""

    def download(path: str) -> dict:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "vae/config.json", revision=revision)).read_text())

    vae_config = _read_model_json(name_or_path, "vae/config.json", revision, local_only, download)
    return None if vae_config is None else family.native_size(denoiser_config, family.vae_scale_factor_of(vae_config))


def read_component_config(name_or_path: str, component: str, revision: str | None = None) -> dict | None:
    """A pipeline component's config (`<component>/config.json`, a scheduler's `scheduler_config.json`), read as
    `read_model_index` reads the index: no weights. The memory estimate builds the models from these."""
    for name in ("config.json", "scheduler_config.json"):
        relative = f"{component}/{name}"

        def download(path: str, relative: str = relative) -> dict | None:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                return json.loads(Path(hf_hub_download(path, relative, revision=revision)).read_text())
            except EntryNotFoundError:
                return None

        if (config := _read_model_json(name_or_path, relative, revision, False, download)) is not None:
            return config
    return None



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
    `transformer.`), where the families that fit all write the same UI export (SD and SDXL, SD3 and FLUX.1):
    the first registered of them. UnsupportedModelError where none fits, or where those that fit export
    differently: then only the model can say (`family_of`)."""
    from safetensors import safe_open

    from utils.families.base import FAMILIES

    with safe_open(str(lora_file), framework="pt") as f:
        keys = list(f.keys())
    fits = [family for family in FAMILIES
            if keys and all(k.startswith(family.denoiser_name + ".") for k in keys)]
    if not fits:
        raise UnsupportedModelError(f"{lora_file} is not a draftplus LoRA (its keys name no denoiser component)")
    exports = {(family.export_ui_lora.__func__, family.ui_lora_name) for family in fits}
    if len(exports) > 1:
        names = ", ".join(family.display_name for family in fits)
        raise UnsupportedModelError(f"{lora_file} could be a LoRA of {names}, whose files differ: give the model "
                                    "it was trained on (--model)")
    return fits[0]
