"""Assemble benchmarks/RESULTS.md, and docs/evaluation.md's summary of it, from the files the benchmark scripts wrote
into benchmarks/results/.

    python -m benchmarks.tradeoff && python -m benchmarks.tradeoff --toy toy-flow && python -m benchmarks.speed_memory \
        && python -m benchmarks.report

No figure in RESULTS.md or in the docs is typed by hand: each RESULTS.md section is a benchmark's own output,
and docs/evaluation.md's block between the `benchmark-summary` markers is written here from the same results files
(a test fails when the committed page and results disagree).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The flow-matching models' memory goals (benchmarks/flow_memory.py), by results file.
FLOW_MEMORY = {"flow_memory_sd35m_cuda": "SD3.5-Medium size", "flow_memory_flux1dev_nf4_cuda": "FLUX.1-dev size, nf4",
               "flow_memory_flux1dev_cuda": "FLUX.1-dev size"}
SECTIONS = ("tradeoff.md", "tradeoff_flow.md", "quickstart_cpu.md", "speed_memory_toy_cpu.md",
            "speed_memory_sd15_cuda.md", "speed_memory_sdxl_cuda.md", *(f"{stem}.md" for stem in FLOW_MEMORY), "endurance_toy_cpu.md", "mutations.md",
            "memory_calibration.md", "memory_table.md", "memory_sharded.md", "shard_host_memory.md")
GPU_ONLY = {"speed_memory_sd15_cuda.md": "python -m benchmarks.speed_memory --sd15 --device cuda",
            "speed_memory_sdxl_cuda.md": "python -m benchmarks.speed_memory --sdxl --device cuda",
            "flow_memory_sd35m_cuda.md": "python -m benchmarks.flow_memory --model sd35m --device cuda",
            "flow_memory_flux1dev_nf4_cuda.md": "python -m benchmarks.flow_memory --model flux1dev --quantize_base nf4 "
                                                "--device cuda",
            "flow_memory_flux1dev_cuda.md": "python -m benchmarks.flow_memory --model flux1dev --device cuda"}
# The toys whose trade-off results are compared, in the order of their columns:
# (results stem, name in the tables, name in the README's summary).
TRADEOFF_TOYS = (("tradeoff", "UNet toy (`toy`)", "toy"), ("tradeoff_flow", "flow toy (`toy-flow`)", "flow toy"))


def demote_headings(text: str) -> str:
    """Each Markdown heading one level down (a report's sections nest under RESULTS.md's), code blocks untouched."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(lines) + "\n"


def earlier_format_note(name: str) -> str | None:
    """Speed reports measured before the plain-pipeline comparison timed one pipeline only: the one with the
    LoRA-wrapped UNet (their JSON has no `compile` section)."""
    json_path = HERE / "results" / name.replace(".md", ".json")
    if name.startswith("speed_memory_") and json_path.exists() and "compile" not in json.loads(json_path.read_text()):
        return ("> Measured before the plain-pipeline comparison: the pipeline timed here ran the trainer's LoRA-wrapped UNet (PEFT "
                "layers), not a plain UNet, and nothing was compiled; `bash benchmarks/gpu_checks.sh` measures "
                "both against the plain pipeline.")
    return None


def _mean_reward(rows: list[dict]) -> float:
    return sum(r["reward"] for r in rows) / len(rows)


def gpu_training_section(results: Path | None = None) -> str | None:
    """The toy trainer runs of `benchmarks/gpu_checks.sh` (stages train, train_compile): one row per run, from the
    files the trainer wrote (metrics.jsonl, validation_reward.json) and the command the script recorded."""
    results = results or HERE / "results"
    runs = []
    for validation in sorted(results.glob("gpu_train_toy*_validation.json")):
        run = validation.name.removeprefix("gpu_train_toy").removesuffix("_validation.json").lstrip("_")
        metrics = results / f"gpu_train_toy{'_' + run if run else ''}_metrics.jsonl"
        if not metrics.exists():
            continue
        command = results / f"gpu_train_toy_{run}_command.txt"
        runs.append((run or "earlier run", [json.loads(line) for line in metrics.read_text().splitlines()],
                     json.loads(validation.read_text()), command.read_text().strip() if command.exists() else None))
    if not runs:
        return None
    lines = ["## Trainer on a GPU (toy)", "",
             "The `train` and `train_compile` stages of `bash benchmarks/gpu_checks.sh` (on the machine of the CUDA "
             "sections above): the README quickstart's run with the GPU paths on (bf16 autocast, gradient "
             "checkpointing, 8-bit AdamW, unless the run says otherwise). The numbers are what the trainer logged; "
             "validation: the same fixed-seed images before and after training.", "",
             "| run | steps | training-batch reward, first 5 -> last 5 steps | validation images | "
             "validation reward before -> after | rose |", "|---|---|---|---|---|---|"]
    for run, rows, v, _ in runs:
        n = len(v["prompts"]) * v["images_per_prompt"]
        lines.append(f"| {run} | {len(rows)} | {_mean_reward(rows[:5]):.4f} -> {_mean_reward(rows[-5:]):.4f} | {n} | "
                     f"{v['before']:.4f} -> {v['after']:.4f} | {v['after'] > v['before']} |")
    commands = [(run, command) for run, *_, command in runs if command]
    if commands:
        lines += ["", "Commands:", ""] + [f"- {run}: `{command}`" for run, command in commands]
    return "\n".join(lines)


def _every_toys_results(results: Path | None) -> dict[str, dict] | None:
    """{column name: tradeoff json} of every toy of TRADEOFF_TOYS; None unless all of them have results."""
    results = results or HERE / "results"
    toys = {name: json.loads((results / f"{stem}.json").read_text()) for stem, name, _ in TRADEOFF_TOYS
            if (results / f"{stem}.json").exists()}
    return toys if len(toys) == len(TRADEOFF_TOYS) else None


def _differences(verdicts: dict[str, dict]) -> list[str]:
    """From {column name: `claim_verdicts`}: the claims whose verdicts differ, as `"claim" (toy: verdict; ...)`."""
    from benchmarks.tradeoff import CLAIMS

    return [f"\"{CLAIMS[claim].split(' (')[0]}\" ("
            + "; ".join(f"{name.split(' (')[0]}: {v[claim]['verdict']}" for name, v in verdicts.items()) + ")"
            for claim in CLAIMS if len({v[claim]["verdict"] for v in verdicts.values()}) > 1]


def toy_differences(results: Path | None = None) -> list[str] | None:
    """The claims on which the toys' verdicts differ, as `"claim" (toy: verdict; toy: verdict)`; None unless every
    toy of TRADEOFF_TOYS has results."""
    from benchmarks.tradeoff import claim_verdicts

    toys = _every_toys_results(results)
    return None if toys is None else _differences({name: claim_verdicts(t) for name, t in toys.items()})


def toys_side_by_side(results: Path | None = None) -> str | None:
    """Each DRaFT+ claim's verdict on every toy, one column per toy, and where they differ; None unless every
    toy of TRADEOFF_TOYS has results."""
    from benchmarks.tradeoff import CLAIMS, claim_verdicts

    toys = _every_toys_results(results)
    if toys is None:
        return None
    verdicts = {name: claim_verdicts(t) for name, t in toys.items()}
    differences = _differences(verdicts)
    lines = ["## The DRaFT+ claims on both toys", "",
             "Each claim as decided by its toy's section above (paired statistics, a difference counts beyond 2 SE; "
             "the kl_coeff values differ between the toys, whose penalties have different scales). The toys agree "
             "on a claim when its verdict is the same.", "",
             "| claim | " + " | ".join(toys) + " | |", "|---" * (len(toys) + 2) + "|"]
    for claim, text in CLAIMS.items():
        cells = [f"{v[claim]['verdict']} ({v[claim]['evidence']})" for v in verdicts.values()]
        agree = len({v[claim]["verdict"] for v in verdicts.values()}) == 1
        lines.append(f"| {text} | " + " | ".join(cells) + f" | {'agree' if agree else '**differ**'} |")
    draft = {name: next((r for r in t["summary"] if r["kl_coeff"] == 0), None) for name, t in toys.items()}
    lines.append("| DRaFT (kl_coeff 0), for scale: reward gain vs base, diversity / base | " + " | ".join(
        f"{_diff(d['reward_gain'])}, x{d['diversity_ratio']:.2f}" if d else "-" for d in draft.values()) + " | |")
    lines += ["", ("Where the toys differ: " + "; ".join(differences) + ".") if differences
              else "The toys agree on every claim."]
    return "\n".join(lines)


def _diff(d: dict) -> str:
    return f"{d['mean']:+.4f} ± {d['se']:.4f}"


SUMMARY_PAGE = Path("docs") / "evaluation.md"  # the page that quotes the headline figures, in the repository
BEGIN = "<!-- benchmark-summary:begin (written by `python -m benchmarks.report` from benchmarks/results/) -->"
END = "<!-- benchmark-summary:end -->"


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[len(xs) // 2] + xs[(len(xs) - 1) // 2]) / 2


def _tradeoff_lines(results: Path) -> list[str]:
    lines = [line for stem, _, where in TRADEOFF_TOYS
             for line in _toy_tradeoff_lines(results / f"{stem}.json", where)]
    differences = toy_differences(results)
    if differences is not None:
        lines.append("- UNet toy vs flow toy: " + (("they differ on " + "; ".join(differences) + ".") if differences
                                                  else "the same verdict on every claim."))
    return lines


def _toy_tradeoff_lines(path: Path, where: str) -> list[str]:
    from benchmarks.tradeoff import CONTROL_NAMES, claim_verdicts

    if not path.exists():
        return []
    t = json.loads(path.read_text())
    rises = sum(r["reward_gain"]["verdict"] == 1 for r in t["summary"])
    rev_reward = [f"{r['a'].split('/')[0]} vs {r['b'].split('/')[0]}" for r in t["reward_order"] if r["verdict"] == -1]
    res_reward = sum(r["verdict"] == 1 for r in t["reward_order"])
    res_div = sum(r["verdict"] == -1 for r in t["diversity_order"])
    rev_div = sum(r["verdict"] == 1 for r in t["diversity_order"])
    claim = t["matched_reward"]["claim"]
    holds = claim_verdicts(t)["matched_reward"]["verdict"]
    draft = next((r for r in t["summary"] if r["kl_coeff"] == 0), None)
    lines = [f"- Trade-off on the {where} (`{t['diversity_metric']}` diversity, paired seeds, claims beyond 2 SE): "
             f"reward rises for {rises} of {len(t['summary'])} kl_coeff settings; lower kl_coeff gives more reward "
             f"for {res_reward} of {len(t['reward_order'])} neighbouring pairs"
             + (f" (reversed: {', '.join(rev_reward)})" if rev_reward else "")
             + f" and less diversity for {res_div} of {len(t['diversity_order'])} (the rest within noise"
             + (f", {rev_div} reversed" if rev_div else "") + "); at matched reward DRaFT+ keeps more diversity than "
             f"DRaFT: {holds} ({claim['more']} of {claim['compared']} comparable front points more, {claim['less']} "
             f"less)." + (f" DRaFT: reward gain {draft['reward_gain']['mean']:+.3f}, diversity x"
                          f"{draft['diversity_ratio']:.2f}." if draft else "")]
    best = [row.get("best") for row in t["controls"]]
    leaders = [row.get("leader") for row in t["controls"] if row.get("leader")]
    if leaders:
        lines.append(f"- Post-hoc controls at matched reward ({where}): the most diversity at "
                     + ", ".join(f"{r['reward']:.3f}: {CONTROL_NAMES[r['leader']]}"
                                 + ("" if r.get("best") else " (within noise)")
                                 for r in t["controls"] if r.get("leader"))
                     + f"; resolved at {sum(b is not None for b in best)} of {len(best)} reward levels.")
    return lines


def _speed_lines(results: Path) -> list[str]:
    lines = []
    for name, label in (("speed_memory_toy_cpu.json", "toy, CPU"), ("speed_memory_sd15_cuda.json", "SD1.5 size, GPU"),
                        ("speed_memory_sdxl_cuda.json", "SDXL size, GPU")):
        path = results / name
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        machine = d["machine"].split(" ; ")[0]
        for row in d.get("timing", []):
            if "times" in row:  # four-sided format
                m = {k: _median(v) for k, v in row["times"].items()}
                parts = [f"eager {m['train'] / m['pipeline']:.2f}x the plain pipeline"]
                if "train_compiled" in m:
                    parts.append(f"`--compile` {m['train_compiled'] / m['pipeline']:.2f}x")
                    if "pipeline_compiled" in m:
                        parts.append(f"{m['train_compiled'] / m['pipeline_compiled']:.2f}x the compiled pipeline")
                if "pipeline_lora" in m:
                    parts.append(f"eager {m['train'] / m['pipeline_lora']:.2f}x the LoRA-wrapped pipeline")
                lines.append(f"- One training sample ({label}, {machine}, batch {row['batch_size']}, T={row['T']}): "
                             + ", ".join(parts) + ".")
            else:  # measured before the plain-pipeline comparison existed
                lines.append(f"- One training sample ({label}, {machine}, T={row['T']}): {row['ratio']:.2f}x the "
                             "pipeline with the trainer's LoRA-wrapped UNet (measured before the plain-pipeline "
                             "comparison; not yet remeasured).")
        for row in d.get("peak_batch1", []):
            lines.append(f"- Peak GPU memory ({label}, batch {row['batch_size']}, T={row['T']}, K={row['K']}, "
                         f"gradient checkpointing {'on' if row['gradient_checkpointing'] else 'off'}): "
                         f"{row['peak_allocated_bytes'] / 2**30:.2f} GiB allocated, "
                         f"{row['peak_reserved_bytes'] / 2**30:.2f} GiB reserved.")
    return lines


def _flow_memory_lines(results: Path) -> list[str]:
    lines = []
    for stem, label in FLOW_MEMORY.items():
        path = results / f"{stem}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        parts = []
        if "peak_reserved_bytes" in d:
            parts.append(f"peak {d['peak_allocated_bytes'] / 2**30:.2f} GiB allocated, "
                         f"{d['peak_reserved_bytes'] / 2**30:.2f} GiB reserved (goal <= {d['goal_gb']} GB: "
                         f"{'met' if d['fits_goal'] else 'missed'})")
        if "train_over_pipeline" in d:
            parts.append(f"training sample {d['train_over_pipeline']:.2f}x the pipeline")
        lines.append(f"- One training sample ({label}, {d['machine'].split(' ; ')[0]}, {d['image_size']}px, batch 1, "
                     f"K=1, T={d['T']}, gradient checkpointing): " + "; ".join(parts) + ".")
    return lines


def _endurance_lines(results: Path) -> list[str]:
    path = results / "endurance_toy_cpu.json"
    if not path.exists():
        return []
    s = json.loads(path.read_text())["summary"]
    return [f"- Endurance ({s['steps']} steps on the toy, first vs last {s['window']}): resident memory "
            f"{s['rss_first_median_mib']:.1f} -> {s['rss_last_median_mib']:.1f} MiB, step time x{s['step_time_ratio']:.2f}."]


def readme_summary(results: Path | None = None) -> str:
    """The summary page's block of headline figures, each computed from a committed results file."""
    results = results or HERE / "results"
    lines = [*_tradeoff_lines(results), *_speed_lines(results), *_flow_memory_lines(results),
             *_endurance_lines(results)]
    return "\n".join([BEGIN, *lines, END])


def update_readme(readme: Path | None = None, results: Path | None = None) -> bool:
    """Replace the summary block of `readme` (default: docs/evaluation.md beside the benchmarks folder this report
    was run for); False if there is no such page or it has no markers."""
    readme = readme or HERE.parent / SUMMARY_PAGE  # HERE at call time: tests point it at a copy
    if not readme.is_file():
        return False
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    readme.write_text(head + readme_summary(results) + rest.split(END, 1)[1])
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu_training_only", metavar="RESULTS_DIR", default=None,
                        help="Print only the GPU trainer section of the files in RESULTS_DIR (gpu_checks.sh's summary).")
    args = parser.parse_args(argv)
    if args.gpu_training_only:
        print(gpu_training_section(Path(args.gpu_training_only)) or "")
        return
    parts = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.report` from the files in `benchmarks/results/`; each section "
             "names the command that produced it. Timings are only comparable within one section (one run, one "
             "machine).", ""]
    missing = []
    for name in SECTIONS:
        path = HERE / "results" / name
        if not path.exists():
            missing.append(name)
            continue
        text = demote_headings(path.read_text().replace("](tradeoff", "](results/tradeoff"))
        note = earlier_format_note(name)
        if note:
            heading, _, rest = text.partition("\n")
            text = f"{heading}\n\n{note}\n{rest}"
        parts += ["---", "", text]
        if name == f"{TRADEOFF_TOYS[-1][0]}.md" and (both := toys_side_by_side()):
            parts += ["---", "", both, ""]
    gpu_run = gpu_training_section()
    if gpu_run:
        parts += ["---", "", gpu_run, ""]
    if missing:
        how = [f"`{m}`" + (f" (needs a GPU: `{GPU_ONLY[m]}`, or `bash benchmarks/gpu_checks.sh`)" if m in GPU_ONLY
                           else "") for m in missing]
        parts += ["---", "", "Not measured yet: " + ", ".join(how) + ".", ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'}")
    if update_readme():
        print(f"updated the benchmark summary in {HERE.parent / SUMMARY_PAGE}")


if __name__ == "__main__":
    main()
