"""Prompt sources for `--prompts`: built-in sets, text files, datasets and webdataset tars.

DRaFT+ needs prompts only (no images), so every source reduces to a list of strings. Cheap checks
live in `check_prompt_source` so the trainer can reject bad input before it loads any model.
"""

from __future__ import annotations

import os
import random
import tarfile
from collections.abc import Sequence

# The 45 "simple animals" of the DDPO / AlignProp benchmarks.
ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
    "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
    "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()

PICKAPIC_DATASET = "yuvalkirstain/pickapic_v2_no_images"
BUILTIN_SOURCES = ("animals", "pickapic")


class PromptSourceError(ValueError):
    """A `--prompts` value that cannot give any prompt."""


def _is_local_dataset(source: str) -> bool:
    return os.path.isdir(source) or source.endswith((".csv", ".json", ".jsonl", ".parquet"))


def check_prompt_source(source: str) -> None:
    """Fail fast (one line) on sources that can be checked without loading a dataset."""
    if source in BUILTIN_SOURCES:
        return
    looks_local = source.startswith(("/", "./", "../", "~")) or source.endswith((".txt", ".tar"))
    if looks_local or _is_local_dataset(source):
        if not os.path.exists(source):
            raise PromptSourceError(f"prompt source {source!r} does not exist")
    if source.endswith(".txt") and not _read_text_prompts(source):
        raise PromptSourceError(f"prompt file {source!r} has no prompts (one prompt per non-empty line)")
    if source.endswith(".tar") and not _read_webdataset_prompts(source):
        raise PromptSourceError(f"webdataset {source!r} has no .txt entries")


def _read_text_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _read_webdataset_prompts(path: str) -> list[str]:
    """Prompts from a webdataset shard: one `<key>.txt` member per sample (NeMo-Aligner's format)."""
    prompts = []
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".txt"):
                text = tar.extractfile(member).read().decode("utf-8").strip()
                if text:
                    prompts.append(text)
    return prompts


def _read_dataset_prompts(source: str, column: str | None, split: str) -> list[str]:
    import datasets

    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        dataset = datasets.load_from_disk(source)  # a single split saved with save_to_disk
    elif os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json")):
        dataset = datasets.load_from_disk(source)[split]
    elif os.path.isfile(source):
        builder = {"jsonl": "json"}.get(source.rsplit(".", 1)[-1], source.rsplit(".", 1)[-1])
        dataset = datasets.load_dataset(builder, data_files=source, split="train")
    else:
        dataset = datasets.load_dataset(source, split=split)
    column = column or next((c for c in ("prompt", "caption", "text") if c in dataset.column_names), None)
    if column is None or column not in dataset.column_names:
        raise PromptSourceError(
            f"dataset {source!r} has no prompt column {column!r}; columns: {dataset.column_names} "
            "(choose one with --prompt_column)"
        )
    return [p.strip() for p in dataset[column] if isinstance(p, str) and p.strip()]


def load_prompts(source: str, prompt_column: str | None = None, split: str = "train") -> list[str]:
    """All prompts of a source, in order, duplicates removed."""
    check_prompt_source(source)
    if source == "animals":
        prompts = list(ANIMALS)
    elif source == "pickapic":
        prompts = _read_dataset_prompts(PICKAPIC_DATASET, prompt_column or "caption", split)
    elif source.endswith(".txt"):
        prompts = _read_text_prompts(source)
    elif source.endswith(".tar"):
        prompts = _read_webdataset_prompts(source)
    else:
        prompts = _read_dataset_prompts(source, prompt_column, split)
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise PromptSourceError(f"prompt source {source!r} gave no prompts")
    return prompts


def sample_prompts(prompts: Sequence[str], batch_size: int, seed: int, *keys: int) -> list[str]:
    """A batch drawn with replacement, fixed by (seed, *keys).

    Keying on (step, micro-step, process) rather than carrying an iterator makes a resumed run
    see exactly the prompts it would have seen without the interruption.
    """
    rng = random.Random(hash((seed, *keys)))
    return [prompts[rng.randrange(len(prompts))] for _ in range(batch_size)]
