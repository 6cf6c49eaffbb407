"""The pretrained toy: where it is, its cache, the committed copy in assets/toy and the command line.

`toy` (the `--pretrained_model_name_or_path` the trainer and evaluator accept) is a small Stable Diffusion
pipeline pretrained on 32x32 coloured shapes ("a red circle on a blue background"); `utils.toy_pretrain`
trains it, `utils.toy_data` draws its data. A build is identified by its cache key: the toy's version
(`TOY_VERSION`, bumped by hand when the training code changes what it builds) and its training config.

    python -m utils.toy                                   # path of the toy (committed copy, or build + cache)
    python -m utils.toy --output_dir assets/toy --force   # rebuild the committed copy (~4 min on 2 cores)
    python -m utils.toy --check                           # is the committed copy current? (exit 0 / 1)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from utils import toy_pretrain
from utils.toy_pretrain import TOY_SEED, ToyTrainConfig, save_toy_pipeline, train_toy_pipeline

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy"
BUILD_INFO_FILE = "toy_build.json"


def _config_record(cfg: ToyTrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as read back from toy_build.json


def toy_cache_key(config: ToyTrainConfig | None = None) -> str:
    """sha256 of the toy's version and its training config (default: the defaults): what determines a build.
    The torch version is not part of it, so a toy built elsewhere stays usable; `--check` compares it apart."""
    record = {"toy_version": toy_pretrain.TOY_VERSION, "config": _config_record(config or ToyTrainConfig())}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()


def cache_dir() -> Path:
    """`$DRAFTPLUS_CACHE`, else `~/.cache/draftplus`."""
    return Path(os.environ.get("DRAFTPLUS_CACHE") or Path.home() / ".cache" / "draftplus")


def read_build_info(directory: str | os.PathLike) -> dict | None:
    """The toy_build.json of a built toy directory, or None if it is not a complete build."""
    directory = Path(directory)
    info = directory / BUILD_INFO_FILE
    if not info.is_file() or not (directory / "model_index.json").is_file():
        return None
    try:
        return json.loads(info.read_text())
    except json.JSONDecodeError:
        return None


def is_current_build(directory: str | os.PathLike, config: ToyTrainConfig | None = None) -> bool:
    """Whether `directory` holds a complete toy whose cache key is the current one for `config`."""
    info = read_build_info(directory)
    return info is not None and info.get("cache_key") == toy_cache_key(config)


def _build_into(target: Path, cfg: ToyTrainConfig, log: Callable[[str], None]) -> None:
    """Train into a temporary sibling, then move the files into `target`: an interrupted build never leaves
    a directory that looks complete (toy_build.json, the completeness marker, is moved last)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # Every core we may use: launchers (accelerate, OMP_NUM_THREADS=1) often lower torch's default.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(cores)
    start = time.time()
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.tmp-") as tmp:
            tmp = Path(tmp)
            pipe = train_toy_pipeline(cfg, log=lambda m: log(f"[{time.time() - start:5.0f}s] {m}"))
            save_toy_pipeline(pipe, tmp)
            info = {
                "toy_version": toy_pretrain.TOY_VERSION,
                "cache_key": toy_cache_key(cfg),
                "seconds": round(time.time() - start, 1),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "config": _config_record(cfg),
            }
            (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            target.mkdir(exist_ok=True)
            (target / BUILD_INFO_FILE).unlink(missing_ok=True)
            for entry in sorted(tmp.iterdir(), key=lambda p: p.name == BUILD_INFO_FILE):
                dest = target / entry.name
                if dest.is_dir():
                    shutil.rmtree(dest)
                os.replace(entry, dest)
    finally:
        torch.set_num_threads(threads)
    log(f"toy built in {time.time() - start:.0f}s -> {target}")


def build_toy_pipeline(
    output_dir: str | os.PathLike | None = None,
    force: bool = False,
    config: ToyTrainConfig | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Path of the pretrained toy pipeline directory (a standard `StableDiffusionPipeline`).

    Without `output_dir`: the committed `assets/toy` if its recorded cache key is current, else
    `<cache>/toy-<key[:16]>`, built there on first use (~4 minutes on 2 cores); a non-default `config` has
    its own key, hence its own cache entry. With `output_dir`: that directory, (re)built unless it already
    holds a current build. `force` always rebuilds.
    """
    config = config or ToyTrainConfig()
    if output_dir is None:
        if not force and is_current_build(ASSETS_DIR, config):
            return ASSETS_DIR
        target = cache_dir() / f"toy-{toy_cache_key(config)[:16]}"
    else:
        target = Path(output_dir)
    if force or not is_current_build(target, config):
        log(f"building the pretrained toy into {target} ...")
        _build_into(target, config, log)
    return target


def committed_toy_is_current(log: Callable[[str], None] = print) -> bool:
    """The committed toy's cache key (toy version, config) and the torch that built it match this checkout;
    if not, `log` says why."""
    info = read_build_info(ASSETS_DIR)
    if info is None:
        log(f"{ASSETS_DIR} holds no complete toy build")
        return False
    if not is_current_build(ASSETS_DIR):
        log(f"the toy's training code (TOY_VERSION {info.get('toy_version')} -> {toy_pretrain.TOY_VERSION}) "
            "or config changed since assets/toy was built")
        return False
    if info.get("torch") != torch.__version__:
        log(f"assets/toy was built with torch {info.get('torch')}, this is torch {torch.__version__}")
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m utils.toy", description="Build (or locate) the pretrained toy model.")
    p.add_argument("--output_dir", default=None,
                   help="Where to build it (default: the committed assets/toy if current, else the cache "
                        "$DRAFTPLUS_CACHE or ~/.cache/draftplus).")
    p.add_argument("--force", action="store_true", help="Rebuild even if a current build exists.")
    p.add_argument("--seed", type=int, default=TOY_SEED,
                   help="Training seed; another seed than the committed one's builds its own cache entry.")
    p.add_argument("--check", action="store_true",
                   help="Build nothing: exit 0 if the committed assets/toy was built by this toy version, config "
                        "and torch version, else print why and exit 1 (CI then runs the rebuild test).")
    args = p.parse_args(argv)
    if args.check:
        if not committed_toy_is_current(print):
            raise SystemExit(1)
        print(f"assets/toy is current: toy version {toy_pretrain.TOY_VERSION}, cache key {toy_cache_key()[:16]}, "
              f"torch {torch.__version__}")
        return
    print(build_toy_pipeline(args.output_dir, force=args.force, config=ToyTrainConfig(seed=args.seed)))


if __name__ == "__main__":
    main()
