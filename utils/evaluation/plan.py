"""The evaluator's rows: which LoRAs, at which adapter weights, under which control; checked before any model loads.

    base                    the base model
    NAME                    a LoRA (NAME: its directory's name), at full strength
    NAME@scale=S            the LoRA at strength S (diffusers' adapter weights)
    NAME@aig=SCHEDULE       the LoRA under annealed importance guidance (see utils/evaluation/aig.py)
    mix(a=0.5,b=0.5)        a weighted combination of LoRAs

Every LoRA file is hashed (sha256 of its bytes) when the rows are planned: a row's numbers belong to
those bytes, so a LoRA retrained in place is evaluated again rather than reported from an earlier run.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from utils.evaluation.settings import EvaluationError, python_option

CONTROLS = ("base", "lora", "scale", "aig", "mix")


def _weights_name() -> str:
    from utils.lora import LORA_WEIGHTS_NAME  # imported when needed: utils.lora loads diffusers and peft

    return LORA_WEIGHTS_NAME


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Adapter(NamedTuple):
    """One LoRA of a row: its label, weights file, adapter weight and the file's sha256."""

    label: str
    file: Path
    weight: float
    sha256: str


@dataclass(frozen=True)
class Variant:
    """One row: which LoRAs at which adapter weights, and whether AIG steers them."""

    label: str
    control: str  # one of CONTROLS
    adapters: tuple[Adapter, ...] = ()
    aig: str | None = None
    lora_scale: float | None = None

    @property
    def lora(self) -> str:
        return "+".join(a.label for a in self.adapters)

    @property
    def path(self) -> str | None:
        """The LoRA directories (or files) as given, `;`-separated: the row's `path` field."""
        if not self.adapters:
            return None
        return ";".join(str(a.file.parent if a.file.name == _weights_name() else a.file) for a in self.adapters)

    @property
    def sha256(self) -> str:
        """The LoRA files' sha256s, `;`-separated (empty for the base model): the row's `lora_sha256` field."""
        return ";".join(a.sha256 for a in self.adapters)


def lora_label_and_file(path: str | os.PathLike) -> tuple[str, Path]:
    """A LoRA argument -> (label, weights file). Directories (a trainer output or `checkpoint-N`) must hold
    the trainer's LoRA weights file; a `.safetensors` file is taken as is."""
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / _weights_name()
    if not path.exists():
        raise EvaluationError(f"LoRA {str(path)!r} does not exist")
    if not file.is_file():
        raise EvaluationError(f"LoRA {str(path)!r} has no {_weights_name()}")
    return (path.name if path.is_dir() else path.stem), file


def _unique_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Directory names, prefixed by their parent where two would collide (run-a/checkpoint-20, run-b/...)."""
    labels = [lora_label_and_file(p)[0] for p in paths]
    out = []
    for p, label in zip(paths, labels, strict=True):
        if labels.count(label) > 1 or label == "base":
            resolved = Path(p).resolve()
            label = f"{resolved.parent.name}/{label}" if resolved.is_dir() else f"{resolved.parent.name}/{resolved.name}"
        out.append(label)
    if len(set(out)) != len(out):
        raise EvaluationError(f"LoRA labels are ambiguous: {out}")
    return out


def parse_mix(items: Sequence[str] | Mapping[str, float], spell: Callable[[str], str] = python_option
              ) -> dict[str, float]:
    """`["a=0.5", "b=0.5"]` (or a mapping) -> {"a": 0.5, "b": 0.5}; names are LoRA labels or paths."""
    mix_option = spell("mix")
    if isinstance(items, Mapping):
        pairs = [(str(k), v) for k, v in items.items()]
    else:
        pairs = []
        for item in items:
            name, sep, weight = str(item).rpartition("=")
            if not sep or not name:
                raise EvaluationError(f"{mix_option} takes NAME=WEIGHT items, got {item!r}")
            pairs.append((name, weight))
    mix: dict[str, float] = {}
    for name, weight in pairs:
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise EvaluationError(f"{mix_option} {name}={weight}: the weight is not a number") from None
        if not math.isfinite(value):
            raise EvaluationError(f"{mix_option} {name}={weight}: the weight must be finite")
        if name in mix:
            raise EvaluationError(f"{mix_option} names {name!r} twice")
        mix[name] = value
    if not mix:
        raise EvaluationError(f"{mix_option} needs at least one NAME=WEIGHT")
    return mix


def plan_variants(
    loras: Sequence[str | os.PathLike] = (),
    lora_scales: Sequence[float] = (),
    aig: Sequence[str] = (),
    mixes: Sequence[Sequence[str] | Mapping[str, float]] = (),
    include_base: bool = True,
    spell: Callable[[str], str] = python_option,
) -> list[Variant]:
    """The rows to evaluate, in order: base, then per LoRA its plain, scaled and AIG rows, then the
    mixes. Every input is checked here, before any model is loaded; `spell` names options in messages
    as the caller wrote them (`python_option` or `cli_option`)."""
    from utils.evaluation.aig import check_schedule

    labels = _unique_labels(loras)
    files = [lora_label_and_file(p)[1] for p in loras]
    if (lora_scales or aig) and not loras:
        raise EvaluationError(f"{spell('lora_scale')} and {spell('aig')} apply to the LoRAs given with "
                              f"{spell('lora')}: give at least one")
    if not include_base and not (loras or mixes):
        raise EvaluationError(f"{spell('no_base')} needs at least one {spell('lora')} or {spell('mix')}")
    for scale in lora_scales:
        if not math.isfinite(scale):
            raise EvaluationError(f"{spell('lora_scale')} {scale}: must be finite")
    schedules = [check_schedule(s) for s in aig]
    hashes: dict[Path, str] = {}

    def adapter(label: str, file: Path, weight: float) -> Adapter:
        if file not in hashes:
            hashes[file] = file_sha256(file)
        return Adapter(label, file, float(weight), hashes[file])

    variants = [Variant("base", "base")] if include_base else []
    for label, file in zip(labels, files, strict=True):
        variants.append(Variant(label, "lora", (adapter(label, file, 1.0),)))
        variants += [Variant(f"{label}@scale={s:g}", "scale", (adapter(label, file, s),), lora_scale=float(s))
                     for s in lora_scales]
        variants += [Variant(f"{label}@aig={s}", "aig", (adapter(label, file, 1.0),), aig=s) for s in schedules]
    by_label = dict(zip(labels, files, strict=True))
    for items in mixes:
        adapters = []
        for name, weight in parse_mix(items, spell).items():
            if name in by_label:
                adapters.append(adapter(name, by_label[name], weight))
            elif Path(name).exists():
                adapters.append(adapter(*lora_label_and_file(name), weight))
            else:
                raise EvaluationError(f"{spell('mix')} {name}: neither the label of a {spell('lora')} "
                                      f"({', '.join(labels) or 'none'}) nor a LoRA directory")
        if len({a.label for a in adapters}) != len(adapters):
            raise EvaluationError(f"{spell('mix')} {' '.join(map(str, items))}: two components have the same label")
        label = "mix(" + ",".join(f"{a.label}={a.weight:g}" for a in adapters) + ")"
        variants.append(Variant(label, "mix", tuple(adapters)))
    seen = [v.label for v in variants]
    duplicates = sorted({label for label in seen if seen.count(label) > 1})
    if duplicates:
        raise EvaluationError(f"rows requested twice: {', '.join(duplicates)}")
    return variants
