"""The evaluator's files: tables, the reward-vs-diversity plot, labelled sample grids, and reading them back to resume.

In `output_dir`: `results.json` (settings, fingerprint, rows), `results.csv` (ROW_FIELDS), `per_prompt.csv`,
`per_image.csv`, `reward_vs_diversity.png`, per row `samples_<row>.png` (its first prompts' images, one
grid row per prompt, titled with the row label) and `samples.png` (those grids one under another, in
row order). The tables are written before results.json, each replaced atomically, so an interruption
leaves files that agree with each other.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from utils.evaluation.settings import EvaluationError, python_option

ROW_FIELDS = (
    "model", "control", "lora", "lora_scale", "aig_schedule", "path", "lora_sha256", "reward", "reward_mean",
    "reward_std", "diversity", "diversity_std", "diversity_metric", "diversity_model", "num_prompts",
    "seeds_per_prompt", "num_images", "num_inference_steps", "guidance_scale", "resolution", "height", "width",
)
PER_PROMPT_FIELDS = ("model", "prompt_index", "prompt", "reward_mean", "diversity")
PER_IMAGE_FIELDS = ("model", "prompt_index", "seed_index", "seed", "prompt", "reward")
RESULTS, SAMPLES = "results.json", "samples.png"
PROMPT_LABEL_CHARS = 40  # a grid row's prompt label is cut here, so grids stay as wide as their images


class Evaluation(NamedTuple):
    """What `utils.evaluation.evaluate.evaluate` returns. `rows`: one per requested row (and, when resuming, the
    earlier rows of results.json), fields ROW_FIELDS; `per_prompt`: one per (row, prompt),
    PER_PROMPT_FIELDS; `grids`: per row evaluated now, its first `grid_prompts` prompts' images
    `[n * seeds, 3, H, W]`; `per_image`: one per (row, prompt index, seed index), PER_IMAGE_FIELDS: the
    same (i, j) is the same initial noise in every row, so rows can be compared image by image."""

    rows: list[dict]
    per_prompt: list[dict]
    grids: dict[str, torch.Tensor]
    per_image: list[dict]


# ----------------------------------------------------------------------------------------- tables


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def _write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str]) -> None:
    def write(target: Path) -> None:
        with open(target, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    _atomic_write(path, write)


def _read_csv(path: Path, types: dict[str, type]) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: types.get(k, str)(v) for k, v in row.items()} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------------------- plot


def _lora_of(row: dict) -> str:
    """The LoRA a row steers (rows written before `lora` was a field: their label)."""
    return row.get("lora") or row["model"].split("@", 1)[0]


def plot_series(rows: Sequence[dict]) -> list[dict]:
    """The plot's series: `{"name", "control", "rows", "line"}`, one per kind of control (and per LoRA
    for LoRA-scale sweeps and AIG schedules). A scale sweep runs from the base model (scale 0) through
    the LoRA's own row (scale 1), ordered by scale, and is drawn as a line."""
    by_label = {row["model"]: row for row in rows}
    control = {row["model"]: row.get("control") or ("base" if row["model"] == "base" else "lora") for row in rows}
    series = []
    if "base" in by_label:
        series.append({"name": "base", "control": "base", "rows": [by_label["base"]], "line": False})
    # A LoRA whose scale is swept is drawn as the sweep's scale-1 point: a circle of its own there would hide
    # under the sweep's marker, a legend entry with nothing to see.
    swept = {_lora_of(row) for row in rows if control[row["model"]] == "scale"}
    plain = [row for row in rows if control[row["model"]] == "lora" and row["model"] not in swept]
    if plain:
        series.append({"name": "LoRA", "control": "lora", "rows": plain, "line": False})
    for kind, title in (("scale", "LoRA scale"), ("aig", "AIG")):
        loras = list(dict.fromkeys(_lora_of(row) for row in rows if control[row["model"]] == kind))
        for lora in loras:
            points = [row for row in rows if control[row["model"]] == kind and _lora_of(row) == lora]
            if kind == "scale":
                ends = [dict(by_label["base"], lora_scale=0.0)] if "base" in by_label else []
                if lora in by_label:
                    ends.append(dict(by_label[lora], lora_scale=1.0))
                points = sorted(points + [e for e in ends if all(float(p["lora_scale"]) != e["lora_scale"]
                                                                 for p in points)],
                                key=lambda row: float(row["lora_scale"]))
            series.append({"name": f"{lora}: {title}", "control": kind, "rows": points, "line": kind == "scale"})
    mixes = [row for row in rows if control[row["model"]] == "mix"]
    if mixes:
        series.append({"name": "LoRA mix", "control": "mix", "rows": mixes, "line": False})
    return series


def _point_label(row: dict, control: str) -> str:
    if control == "scale":
        return f"{float(row['lora_scale']):g}"
    if control == "aig":
        return row.get("aig_schedule") or row["model"].split("@aig=", 1)[-1]
    return row["model"]


def standard_errors(row: dict) -> tuple[float, float]:
    """(diversity, reward) standard errors of a row's means: its std over prompts (diversity) and over images
    (reward), over the square root of their number; 0 for rows written without them."""
    def se(std: object, n: object) -> float:
        try:
            return float(std) / math.sqrt(int(n)) if int(n) > 0 else 0.0
        except (TypeError, ValueError):
            return 0.0

    return se(row.get("diversity_std"), row.get("num_prompts")), se(row.get("reward_std"), row.get("num_images"))


def plot_reward_vs_diversity(rows: Sequence[dict], path: str | os.PathLike) -> list[str]:
    """Diversity on x, mean reward on y, each point with its standard errors (`standard_errors`); every kind
    of control its own series (see `plot_series`): the base model a black star, plain LoRAs circles,
    LoRA-scale sweeps lines, AIG schedules triangles, mixes diamonds.

    The bars are each row's own uncertainty: the between-prompt spread is large next to the gaps between
    rows. Every row sees the same prompts and seeds, so the paired differences are surer than the bars
    suggest (per_prompt.csv holds them). Returns the legend's entries.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"base": "*", "lora": "o", "scale": "s", "aig": "^", "mix": "D"}
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    colors = plt.get_cmap("tab10")
    for k, s in enumerate(plot_series(rows)):
        is_base = s["control"] == "base"
        xs, ys = [r["diversity"] for r in s["rows"]], [r["reward_mean"] for r in s["rows"]]
        xerr, yerr = zip(*(standard_errors(r) for r in s["rows"]), strict=True)
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=("-" if s["line"] else "") + markers[s["control"]],
                    label=s["name"], color="black" if is_base else colors(k % 10), markersize=16 if is_base else 7,
                    zorder=3 if is_base else 2, alpha=0.9, elinewidth=0.8, capsize=2)
        for row in s["rows"]:
            if s["line"] and row.get("control") in ("base", None):
                continue  # the base model is labelled by its own series
            ax.annotate(_point_label(row, s["control"]), (row["diversity"], row["reward_mean"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=7,
                        fontweight="bold" if is_base else "normal")
    first = rows[0]
    ax.set_xlabel(f"diversity: mean pairwise {first['diversity_metric']} per prompt")
    ax.set_ylabel(f"mean reward ({first['reward']})")
    ax.set_title(f"reward vs diversity ({first['num_prompts']} prompts x {first['seeds_per_prompt']} seeds)")
    ax.grid(alpha=0.3)
    legend = ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [text.get_text() for text in legend.get_texts()]


# ----------------------------------------------------------------------------------------- sample grids


def samples_name(label: str) -> str:
    """The file name of a row's sample grid: `samples_<label>.png`, with anything unsafe in a name as `_`."""
    return "samples_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in label) + ".png"


def prompt_label(index: int, prompt: str) -> str:
    text = f"{index}: {prompt}"
    return text if len(text) <= PROMPT_LABEL_CHARS else text[:PROMPT_LABEL_CHARS - 3] + "..."


def sample_grid(label: str, images: torch.Tensor, prompts: Sequence[str], seeds_per_prompt: int):
    """One row's grid: titled with its row label, one grid row per prompt (labelled with it), one column per seed."""
    from utils.evaluation.image_grid import labelled_grid

    rows = [(prompt_label(i, prompt), list(images[i * seeds_per_prompt:(i + 1) * seeds_per_prompt]))
            for i, prompt in enumerate(prompts[: len(images) // seeds_per_prompt])]
    return labelled_grid(rows, title=label)


def _write_samples(out: Path, rows: Sequence[dict], per_prompt: Sequence[dict], grids: dict[str, torch.Tensor],
                   paths: dict[str, Path]) -> None:
    """The new rows' grids, then samples.png: every row's grid on disk, in row order."""
    from PIL import Image

    from utils.evaluation.image_grid import stack_vertically

    prompts = {r["prompt_index"]: r["prompt"] for r in per_prompt}
    prompts = [prompts[i] for i in sorted(prompts)]
    for label, images in grids.items():
        paths[f"samples:{label}"] = out / samples_name(label)
        grid = sample_grid(label, images, prompts, rows[0]["seeds_per_prompt"])
        _atomic_write(paths[f"samples:{label}"], lambda p, grid=grid: grid.save(p, format="PNG"))
    files = [out / samples_name(row["model"]) for row in rows if (out / samples_name(row["model"])).is_file()]
    if files:
        grids_on_disk = []
        for file in files:
            with Image.open(file) as image:
                grids_on_disk.append(image.convert("RGB"))
        paths["samples"] = out / SAMPLES
        combined = stack_vertically(grids_on_disk)
        _atomic_write(paths["samples"], lambda p: combined.save(p, format="PNG"))


# ----------------------------------------------------------------------------------------- writing


def check_output_dir(output_dir: str | os.PathLike, spell: Callable[[str], str] = python_option) -> None:
    """EvaluationError unless `output_dir` is a directory or can be made one (it or a parent is a file)."""
    path = Path(output_dir)
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "" if existing == path else f" (its parent {existing} is a file)"
                raise EvaluationError(f"{spell('output_dir')} {output_dir} is not a directory{where}; "
                                      f"choose another {spell('output_dir')}")
            return


def write_outputs(output_dir: str | os.PathLike, result: Evaluation, settings: dict,
                  fingerprint: dict) -> dict[str, Path]:
    """Writes (or rewrites) every file of the module doc for `result`; grids only for `result.grids`,
    the rows whose images are at hand. Returns the paths by kind."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / RESULTS, "csv": out / "results.csv", "per_prompt": out / "per_prompt.csv",
                 "plot": out / "reward_vs_diversity.png"}
        _write_csv(paths["csv"], result.rows, ROW_FIELDS)
        _write_csv(paths["per_prompt"], result.per_prompt, PER_PROMPT_FIELDS)
        if result.per_image:
            paths["per_image"] = out / "per_image.csv"
            _write_csv(paths["per_image"], result.per_image, PER_IMAGE_FIELDS)
        _atomic_write(paths["plot"], lambda p: plot_reward_vs_diversity(result.rows, p.with_suffix(".png")))
        _write_samples(out, result.rows, result.per_prompt, result.grids, paths)
        document = {"settings": settings, "fingerprint": fingerprint, "results": result.rows}
        _atomic_write(paths["json"], lambda p: p.write_text(json.dumps(document, indent=2) + "\n"))
    except OSError as e:
        raise EvaluationError(f"cannot write the results to {out}: {e}") from e
    return paths


# ----------------------------------------------------------------------------------------- resuming


def read_previous(output_dir: str | os.PathLike, fingerprint: dict,
                  spell: Callable[[str], str] = python_option) -> Evaluation:
    """The rows, per-prompt and per-image records of an earlier run in `output_dir` (empty if none);
    EvaluationError if that run had another fingerprint. `spell` names options as the caller writes them."""
    path = Path(output_dir) / RESULTS
    if not path.is_file():
        return Evaluation([], [], {}, [])
    instead = f"use {spell('overwrite')} to replace them, or another {spell('output_dir')}"
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluationError(f"{path} is not readable ({e}); {instead}") from e
    old = previous.get("fingerprint")
    if old != fingerprint:
        what = ("it was written without settings to compare" if old is None else
                "its " + ", ".join(f"{k}={old.get(k)!r} (now {v!r})" for k, v in fingerprint.items()
                                   if old.get(k) != v))
        raise EvaluationError(f"{path} holds rows from other settings ({what}); {instead}")
    rows = previous.get("results", [])
    labels = {row["model"] for row in rows}
    # Tables are written before results.json: records of a row that never made it there are dropped.
    per_prompt = [r for r in _read_csv(Path(output_dir) / "per_prompt.csv",
                                       {"prompt_index": int, "reward_mean": float, "diversity": float})
                  if r["model"] in labels]
    per_image = [r for r in _read_csv(Path(output_dir) / "per_image.csv",
                                      {"prompt_index": int, "seed_index": int, "seed": int, "reward": float})
                 if r["model"] in labels]
    return Evaluation(rows, per_prompt, {}, per_image)
