"""The base model as a model card names it: a hub id, a local directory (written relative to the directory the run
started in, or shortened to its last part outside it: never a path of the training machine) or a built-in toy,
and its licence (from its own card where that is on disk, else from what its family knows)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from utils.families import ModelFamily
from utils.families.base import License
from utils.toys.toy import TOYS

_ABSOLUTE_PATH = re.compile(r"(?<![^\s,:=(\"'])~?/[^\s,:=\"']*")


class CardPaths:
    """Local paths as the card writes them: relative to `start` (the directory the run started in) when
    they lie under it, else shortened to their last part, remembered in `shortened` so that the card can
    say so. Names that are no absolute paths (hub ids, `animals`, relative paths) stay as they are."""

    def __init__(self, start: str | os.PathLike | None = None) -> None:
        self.start = os.path.abspath(start or os.getcwd())
        self.shortened: list[str] = []

    def path(self, path: str) -> str:
        expanded = os.path.expanduser(path)
        if not os.path.isabs(expanded):
            return path
        if os.path.commonpath([self.start, os.path.abspath(expanded)]) == self.start:
            return os.path.relpath(expanded, self.start)
        short = Path(expanded).name or path
        if short not in self.shortened:
            self.shortened.append(short)
        return short

    def text(self, text: str) -> str:
        """`text` (a reward spec, an option) with every absolute path in it made shareable."""
        return _ABSOLUTE_PATH.sub(lambda m: self.path(m.group(0)), text)


@dataclass
class BaseModel:
    """Where the base model comes from, as the card must say it."""

    name: str  # what the user passed, as the card may write it (no absolute path)
    kind: str  # "hub", "local" or "toy"
    load_path: str  # the Python expression from_pretrained takes in the card's snippet
    source: str = ""  # where it is on this machine (read for its license, never written)

    @property
    def hub_id(self) -> str | None:
        return self.name if self.kind == "hub" else None


# How the card's snippet imports what finds a built-in toy: the committed assets/<toy> when current, else the
# build in draftplus's cache (a toy name is no hub id, and assets/<toy> may be stale).
TOY_IMPORT = "from utils.toys.toy import resolve_model_path  # draftplus's built-in toys"


def describe_base_model(name: str, paths: CardPaths | None = None) -> BaseModel:
    if name in TOYS:
        return BaseModel(name, "toy", f"resolve_model_path({json.dumps(name)})", name)
    if os.path.isdir(name):
        shown = (paths or CardPaths()).path(os.path.abspath(name))
        return BaseModel(shown, "local", json.dumps(shown), name)
    return BaseModel(name, "hub", json.dumps(name), name)


def base_model_license(base: BaseModel, family: type[ModelFamily], revision: str | None = None) -> License | None:
    """The base model's license, from its card's YAML where that card is on disk (a local model's
    README.md, or the hub cache), else for a hub id the family knows (`ModelFamily.licenses`) as its repository
    declares it; None where unknown: the card then names no license."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    readme = None
    if base.kind == "local":
        readme = Path(base.source) / "README.md"
    elif base.kind == "hub":
        cached = try_to_load_from_cache(base.name, "README.md", revision=revision)
        readme = Path(cached) if isinstance(cached, str) else None
    known = family.licenses.get(base.name.lower()) if base.kind == "hub" else None
    if readme is None or not readme.is_file():
        return known
    try:
        metadata = metadata_load(readme) or {}
    except (OSError, ValueError, UnicodeDecodeError):
        return known
    license_id = metadata.get("license")
    if not isinstance(license_id, str) or not license_id:
        return known
    name, link = metadata.get("license_name"), metadata.get("license_link")
    if isinstance(link, str) and "://" not in link:  # relative to the base model's repository
        link = f"https://huggingface.co/{base.name}/blob/main/{link}" if base.kind == "hub" else None
    return License(license_id, name if isinstance(name, str) else None, link if isinstance(link, str) else None)
