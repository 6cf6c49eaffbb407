"""The pretrained toys: where they are, their cache, their committed copies in assets/ and the command line.

Two toys, each a `--pretrained_model_name_or_path` the trainer and evaluator accept, both pretrained on 32x32
coloured shapes ("a red circle on a blue background", `utils.toys.data`):
- `toy`: a small Stable Diffusion pipeline (UNet, DDIM), trained by `utils.toys.pretrain`;
- `toy-flow`: a small Stable Diffusion 3 pipeline (MMDiT, rectified flow), trained by `utils.toys.flow_pretrain`.
A build is identified by its cache key: its toy's version (bumped by hand when the training code changes what it
builds: `TOY_VERSION`, `FLOW_TOY_VERSION`) and its training config.

    python -m utils.toys                                     # path of `toy` (committed copy, or build + cache)
    python -m utils.toys --toy toy-flow                      # path of `toy-flow`
    python -m utils.toys --output_dir assets/toy --force     # rebuild the committed `toy` (~4 min on 2 cores)
    python -m utils.toys --toy toy-flow --output_dir assets/toy-flow --force   # ... `toy-flow` (~3 min)
    python -m utils.toys --check                             # are the committed copies current? (exit 0 / 1)
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
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch
from diffusers import DiffusionPipeline

from utils.toys import flow_pretrain as toy_flow_pretrain
from utils.toys import pretrain as toy_pretrain
from utils.toys.flow_pretrain import FlowToyTrainConfig
from utils.toys.pretrain import TOY_SEED, ToyTrainConfig, save_toy_pipeline

ToyConfig = ToyTrainConfig | FlowToyTrainConfig
ASSETS_ROOT = Path(__file__).resolve().parents[2] / "assets"
BUILD_INFO_FILE = "toy_build.json"


@dataclass(frozen=True)
class ToySpec:
    """One pretrained toy: its name (which is also its directory under assets/), its config class, and the module
    that trains it, whose version constant and training function are read when used (tests replace them)."""

    name: str
    config_class: type
    pretrain: ModuleType
    version_name: str  # the module's version constant
    train_name: str  # the module's `(config, log=...) -> pipeline` function
    build_threads: int | None = None  # torch threads for the build; None: every core we may use

    @property
    def assets_dir(self) -> Path:
        return ASSETS_ROOT / self.name

    @property
    def version(self) -> int:
        return getattr(self.pretrain, self.version_name)

    def train(self, config: ToyConfig, log: Callable[[str], None]) -> DiffusionPipeline:
        return getattr(self.pretrain, self.train_name)(config, log=log)


TOYS = {spec.name: spec for spec in (
    ToySpec("toy", ToyTrainConfig, toy_pretrain, "TOY_VERSION", "train_toy_pipeline"),
    # One thread: the flow toy's ops are too small to share. With two, every op ends in a barrier that waits for a
    # thread the OS may have descheduled: up to 8x slower on a busy 2-core machine, for ~20% less on an idle one.
    ToySpec("toy-flow", FlowToyTrainConfig, toy_flow_pretrain, "FLOW_TOY_VERSION", "train_flow_toy_pipeline",
            build_threads=1),
)}
ASSETS_DIR = TOYS["toy"].assets_dir


def _spec_and_config(name: str, config: ToyConfig | None) -> tuple[ToySpec, ToyConfig]:
    spec = TOYS[name]
    config = config or spec.config_class()
    if not isinstance(config, spec.config_class):
        raise TypeError(f"{name} is configured by {spec.config_class.__name__}, not {type(config).__name__}")
    return spec, config


def _config_record(cfg: ToyConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as read back from toy_build.json


def toy_cache_key(config: ToyConfig | None = None, name: str = "toy") -> str:
    """sha256 of the toy's version and its training config (default: the defaults): what determines a build.
    The torch version is not part of it, so a toy built elsewhere stays usable; `--check` compares it apart."""
    spec, config = _spec_and_config(name, config)
    record = {"toy_version": spec.version, "config": _config_record(config)}
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


def is_current_build(directory: str | os.PathLike, config: ToyConfig | None = None, name: str = "toy") -> bool:
    """Whether `directory` holds a complete build of toy `name` whose cache key is the current one for `config`."""
    info = read_build_info(directory)
    return info is not None and info.get("cache_key") == toy_cache_key(config, name)


def _build_into(target: Path, spec: ToySpec, cfg: ToyConfig, log: Callable[[str], None]) -> None:
    """Train into a temporary sibling, then move the files into `target`: an interrupted build never leaves
    a directory that looks complete (toy_build.json, the completeness marker, is moved last)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # Every core we may use unless the toy says otherwise: launchers (accelerate, OMP_NUM_THREADS=1) often lower
    # torch's default.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(spec.build_threads or cores)
    start = time.time()
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.tmp-") as tmp:
            tmp = Path(tmp)
            pipe = spec.train(cfg, log=lambda m: log(f"[{time.time() - start:5.0f}s] {m}"))
            save_toy_pipeline(pipe, tmp)
            info = {
                "toy_version": spec.version,
                "cache_key": toy_cache_key(cfg, spec.name),
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
    log(f"{spec.name} built in {time.time() - start:.0f}s -> {target}")


def build_toy_pipeline(
    output_dir: str | os.PathLike | None = None,
    force: bool = False,
    config: ToyConfig | None = None,
    log: Callable[[str], None] = print,
    name: str = "toy",
) -> Path:
    """Path of the pretrained toy `name`'s pipeline directory (a standard diffusers pipeline).

    Without `output_dir`: the committed `assets/<name>` if its recorded cache key is current, else
    `<cache>/<name>-<key[:16]>`, built there on first use (minutes); a non-default `config` has its own key,
    hence its own cache entry. With `output_dir`: that directory, (re)built unless it already holds a current
    build. `force` always rebuilds.
    """
    spec, config = _spec_and_config(name, config)
    if output_dir is None:
        if not force and is_current_build(spec.assets_dir, config, name):
            return spec.assets_dir
        target = cache_dir() / f"{name}-{toy_cache_key(config, name)[:16]}"
    else:
        target = Path(output_dir)
    if force or not is_current_build(target, config, name):
        log(f"building the pretrained {name} into {target} ...")
        _build_into(target, spec, config, log)
    return target


def committed_toy_is_current(log: Callable[[str], None] = print, name: str = "toy") -> bool:
    """The committed toy's cache key (toy version, config) and the torch that built it match this checkout;
    if not, `log` says why (one line)."""
    spec = TOYS[name]
    info = read_build_info(spec.assets_dir)
    if info is None:
        log(f"{spec.assets_dir} holds no complete {name} build")
        return False
    if not is_current_build(spec.assets_dir, name=name):
        log(f"the {name}'s training code ({spec.version_name} {info.get('toy_version')} -> {spec.version}) "
            f"or config changed since assets/{name} was built")
        return False
    if info.get("torch") != torch.__version__:
        log(f"assets/{name} was built with torch {info.get('torch')}, this is torch {torch.__version__}")
        return False
    return True


def resolve_model_path(name_or_path: str) -> str:
    """`toy`, `toy-flow` -> that built-in pretrained toy's directory (built on first use when the committed copy
    is stale: minutes); anything else unchanged. For loading weights only."""
    if name_or_path in TOYS:
        return str(build_toy_pipeline(name=name_or_path))
    return name_or_path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m utils.toys", description="Build (or locate) a pretrained toy model.")
    p.add_argument("--toy", choices=list(TOYS), default=None,
                   help="Which toy (default: `toy` to build or locate; every toy with --check).")
    p.add_argument("--output_dir", default=None,
                   help="Where to build it (default: the committed assets/<toy> if current, else the cache "
                        "$DRAFTPLUS_CACHE or ~/.cache/draftplus).")
    p.add_argument("--force", action="store_true", help="Rebuild even if a current build exists.")
    p.add_argument("--seed", type=int, default=TOY_SEED,
                   help="Training seed; another seed than the committed one's builds its own cache entry.")
    p.add_argument("--check", action="store_true",
                   help="Build nothing: one line per committed toy, exit 0 if each was built by its toy version, "
                        "config and this torch version, else 1 (CI then runs the rebuild tests).")
    args = p.parse_args(argv)
    if args.check:
        stale = False
        for name in [args.toy] if args.toy else TOYS:
            if committed_toy_is_current(print, name):
                print(f"assets/{name} is current: {name} version {TOYS[name].version}, "
                      f"cache key {toy_cache_key(name=name)[:16]}, torch {torch.__version__}")
            else:
                stale = True
        if stale:
            raise SystemExit(1)
        return
    name = args.toy or "toy"
    config = TOYS[name].config_class(seed=args.seed)
    print(build_toy_pipeline(args.output_dir, force=args.force, config=config, name=name))

