"""What a run can reach of the Hugging Face hub: offline mode, the local cache, and names that are paths.

Read at call time, not import time (huggingface_hub's own `is_offline_mode()` is fixed when it is imported),
so a check made before any model loads sees the environment the run will have.
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def truthy(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def hub_offline(env: Mapping[str, str] = os.environ, *also: str) -> bool:
    """HF_HUB_OFFLINE (or any of `also`, e.g. HF_DATASETS_OFFLINE) is set."""
    return any(truthy(env.get(name)) for name in ("HF_HUB_OFFLINE", *also))


def hub_cached(repo_id: str, repo_type: str = "model") -> bool:
    """Whether anything of `repo_id` is in the local hub cache (what an offline run can use)."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.file_download import repo_folder_name

    snapshots = os.path.join(HF_HUB_CACHE, repo_folder_name(repo_id=repo_id, repo_type=repo_type), "snapshots")
    return os.path.isdir(snapshots) and any(os.scandir(snapshots))


def looks_like_path(text: str) -> bool:
    """A name that can only be a local path (a hub id is `name` or `owner/name`)."""
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text
