"""What a run can reach of the Hugging Face hub: offline mode, the local cache, and names that are paths.

Read at call time, not import time (huggingface_hub's own `is_offline_mode()` is fixed when it is imported),
so a check made before any model loads sees the environment the run will have. The rule telling a local
path from a hub id lives in `rewards` (the ground floor, which must not import `utils`) and is re-exported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from rewards import looks_like_path

__all__ = ["hub_cached", "hub_offline", "looks_like_path", "truthy"]


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
