"""Prompt sources for `--prompts`: built-in sets, text files, datasets and webdataset tars.

DRaFT+ needs prompts only (no images), so every source reduces to a list of strings. Cheap checks
live in `check_prompt_source` so the trainer can reject bad input before it loads any model.

Large sources: `max_prompts` keeps the first N distinct prompts. With it a hub dataset is streamed
(datasets' `streaming=True`), so only the first rows are fetched instead of every shard, and a local
data file is read only as far as needed.
"""

from __future__ import annotations

import os
import random
import tarfile
from collections.abc import Sequence

from utils.errors import UserError
from utils.hub import hub_cached, hub_offline

# The 45 "simple animals" of the DDPO / AlignProp benchmarks.
ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
    "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
    "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()

PICKAPIC_DATASET = "yuvalkirstain/pickapic_v2_no_images"
BUILTIN_SOURCES = ("animals", "pickapic")


class PromptSourceError(UserError, ValueError):
    """A `--prompts` value that cannot give any prompt."""


DATA_FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
LOCAL_COPY_HINT = ("point --prompts at a local copy (a .txt file, a .csv/.jsonl/.parquet file or a directory "
                   "saved with save_to_disk)")


def _is_local_dataset(source: str) -> bool:
    return os.path.isdir(source) or source.endswith(DATA_FILE_SUFFIXES)


def hub_dataset_id(source: str) -> str | None:
    """The hub dataset a source names (`pickapic` or a dataset id); None for local and built-in sources."""
    if source == "pickapic":
        return PICKAPIC_DATASET
    if source == "animals" or source.startswith(("/", "./", "../", "~")) or source.endswith((".txt", ".tar")):
        return None
    return None if _is_local_dataset(source) or os.path.exists(source) else source


def _offline() -> bool:
    return hub_offline(os.environ, "HF_DATASETS_OFFLINE")


def _hub_dataset_cached(repo_id: str) -> bool:
    """Whether an offline run can read `repo_id`: in the hub cache, or prepared in datasets' cache."""
    from datasets import config as datasets_config

    prepared = os.path.join(str(datasets_config.HF_DATASETS_CACHE), repo_id.replace("/", "___"))
    return hub_cached(repo_id, "dataset") or os.path.isdir(prepared)


def check_prompt_source(source: str, prompt_column: str | None = None, split: str = "train") -> None:
    """Fail fast (one line) on sources that can be checked without a download: missing or empty
    local files, a local dataset without the prompt column, a hub dataset an offline run cannot read."""
    if source == "animals":
        return
    hub_id = hub_dataset_id(source)
    if hub_id is not None:
        if _offline() and not _hub_dataset_cached(hub_id):
            what = f"prompt set {source!r} (the hub dataset {hub_id})" if source != hub_id else f"dataset {hub_id!r}"
            raise PromptSourceError(f"{what} is not in the local cache and HF_HUB_OFFLINE is set; {LOCAL_COPY_HINT}")
        return
    looks_local = source.startswith(("/", "./", "../", "~")) or source.endswith((".txt", ".tar"))
    if looks_local or _is_local_dataset(source):
        if not os.path.exists(source):
            raise PromptSourceError(f"prompt source {source!r} does not exist")
    if source.endswith(".txt") and not _read_text_prompts(source):
        raise PromptSourceError(f"prompt file {source!r} has no prompts (one prompt per non-empty line)")
    if source.endswith(".tar") and not _read_webdataset_prompts(source):
        raise PromptSourceError(f"webdataset {source!r} has no .txt entries")
    if _is_local_dataset(source) and not _read_dataset_prompts(source, prompt_column, split, max_prompts=1,
                                                               streaming=True):
        raise PromptSourceError(f"dataset {source!r} has no prompts (no non-empty text in its prompt column)")


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


def _open_dataset(source: str, split: str, streaming: bool):
    """A datasets Dataset (or IterableDataset when `streaming`) for a local file or directory, a
    save_to_disk directory, or a hub id."""
    import datasets

    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        dataset = datasets.load_from_disk(source)  # a single split saved with save_to_disk
    elif os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_dict.json")):
        dataset = datasets.load_from_disk(source)[split]
    elif os.path.isfile(source):
        builder = {"jsonl": "json"}.get(source.rsplit(".", 1)[-1], source.rsplit(".", 1)[-1])
        return datasets.load_dataset(builder, data_files=source, split="train", streaming=streaming)
    else:
        return datasets.load_dataset(source, split=split, streaming=streaming)
    return dataset.to_iterable_dataset() if streaming else dataset


def _read_dataset_prompts(source: str, column: str | None, split: str, max_prompts: int | None = None,
                          streaming: bool = False) -> list[str]:
    """The first `max_prompts` distinct non-empty prompts of a dataset's prompt column (all without it)."""
    try:
        dataset = _open_dataset(source, split, streaming)
        columns = dataset.column_names
        if columns is None:  # a streamed file: the columns are those of its first row
            columns = list(next(iter(dataset), {}).keys())
    except PromptSourceError:
        raise
    except Exception as e:  # an empty or malformed file, a hub dataset that cannot be reached
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = f"; {LOCAL_COPY_HINT}" if hub_dataset_id(source) else ""
        raise PromptSourceError(f"could not read prompts from {source!r} ({type(e).__name__}: {first}){hint}") from e
    wanted = column or next((c for c in ("prompt", "caption", "text") if c in columns), None)
    if wanted is None or wanted not in columns:
        raise PromptSourceError(
            f"dataset {source!r} has no prompt column {wanted!r}; columns: {columns} (choose one with --prompt_column)"
        )
    values = (row[wanted] for row in dataset) if streaming else dataset[wanted]
    prompts: dict[str, None] = {}
    for value in values:
        if isinstance(value, str) and value.strip():
            prompts[value.strip()] = None
            if max_prompts is not None and len(prompts) >= max_prompts:
                break
    return list(prompts)


def load_prompts(source: str, prompt_column: str | None = None, split: str = "train",
                 max_prompts: int | None = None) -> list[str]:
    """The prompts of a source, in order, duplicates removed; the first `max_prompts` of them if given.

    With `max_prompts`, a hub dataset is streamed (unless offline, where only the cache can serve it)
    and a local data file is read only as far as needed."""
    check_prompt_source(source, prompt_column, split)
    hub_id = hub_dataset_id(source)
    if source == "animals":
        prompts = list(ANIMALS)
    elif source.endswith(".txt"):
        prompts = _read_text_prompts(source)
    elif source.endswith(".tar"):
        prompts = _read_webdataset_prompts(source)
    else:
        column = prompt_column or ("caption" if source == "pickapic" else None)
        streaming = max_prompts is not None and not (hub_id and _offline())
        prompts = _read_dataset_prompts(hub_id or source, column, split, max_prompts, streaming)
    prompts = list(dict.fromkeys(prompts))[:max_prompts]
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
