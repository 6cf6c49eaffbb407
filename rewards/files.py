"""Where a reward's files are: a local path, or a repo (or `owner/repo:filename`) on the Hugging Face Hub.

Hub ids are resolved through `huggingface_hub` (so `HF_HUB_OFFLINE=1` and the local cache are
honoured) and local paths are used as they are, so the same code path serves offline tests and real
runs. Nothing here imports torch: `looks_like_path` is the project's one rule for telling a path
from a hub id, and `utils.hub` re-exports it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import RewardLoadError


def looks_like_path(text: str) -> bool:
    """A name that can only be a local path (a hub id is `name` or `owner/name`)."""
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text


def resolve_file(spec: str | os.PathLike, what: str) -> Path:
    """A local file path, or `owner/repo:filename` on the Hugging Face Hub (downloaded/cached)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    repo_id, sep, filename = text.partition(":")
    if sep and repo_id.count("/") == 1 and filename and not path.parent.is_dir():
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id, filename))
        except Exception as exc:
            raise RewardLoadError(
                f"could not fetch {what} {text!r} from the hub ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "pass a local file instead"
            ) from exc
    raise RewardLoadError(f"{what} not found: {text!r} (expected a local file or owner/repo:filename)")


def resolve_model_files(model: str | os.PathLike, filenames: Sequence[str], what: str) -> dict[str, Path]:
    """`filenames` inside `model`: a local directory, or a hub repo id (downloaded/cached).

    The same code serves both: a directory is read as it is, a hub id goes through
    `hf_hub_download` (which honours `HF_HUB_OFFLINE` and the local cache). Either way a missing
    file is one line naming it and saying how to point at a local copy.
    """
    text = str(model)
    local = Path(text).expanduser()
    need = ", ".join(filenames)
    if local.is_dir():
        missing = [name for name in filenames if not (local / name).is_file()]
        if missing:
            raise RewardLoadError(
                f"{what}: {text!r} has no {', '.join(missing)} (model= must be a directory holding {need})"
            )
        return {name: local / name for name in filenames}
    if looks_like_path(text):
        raise RewardLoadError(f"{what} directory not found: {text!r} (expected a directory holding {need})")
    from huggingface_hub import hf_hub_download

    paths: dict[str, Path] = {}
    for name in filenames:
        try:
            paths[name] = Path(hf_hub_download(text, name))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RewardLoadError(
                f"could not fetch {name} of {what} from the hub repo {text!r} ({type(exc).__name__}: {first}); "
                f"pass model=/local/dir holding {need}"
            ) from exc
    return paths


def prefer_model_dir(
    model: str | os.PathLike, value: str | None, default: str | None, filenames: Sequence[str]
) -> str | None:
    """Where to load a processor/tokenizer from: `value`, unless it was left at its `default` and the
    local `model` directory carries its own copy (one of `filenames`), which then wins.

    So a complete local checkpoint works with `model=` alone, while a model directory without those
    files still gets the official default (e.g. PickScore's LAION processor).
    """
    if value is None or value == default:
        local = Path(str(model)).expanduser()
        if local.is_dir() and any((local / name).is_file() for name in filenames):
            return str(model)
    return default if value is None else value
