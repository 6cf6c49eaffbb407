"""The README's quickstarts as a newcomer runs them: how long they take on 2 CPU cores, with 1 or 2 threads, on an
idle and on a busy machine, and the validation reward they print. The README's quickstart figures come from here.

    python -m benchmarks.quickstart              # both toys; ~10 minutes on 2 cores
    python -m benchmarks.quickstart --repeats 2  # each condition twice (interleaved)

Each training command of README.md's `<!-- runnable -->` blocks runs as printed: the whole command (imports,
training, validation, the end-of-run files), with its output directory moved to a scratch folder and
OMP_NUM_THREADS set per run. "Busy" starts `--busy` processes that spin on the CPU for the run's duration, as the
neighbours on a shared machine do; the runnable tasks sampled every second during the run say how busy it really
was (the kernel's run queue, the run's own threads included; not the 1-minute load average, which lags). The
conditions are interleaved, so that a slower moment of the machine does not fall on one of them only. Writes
benchmarks/results/quickstart_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

README = ROOT / "README.md"
DOCS = ROOT / "docs"
RUNNABLE = "<!-- runnable -->"
STEPS_BAR = re.compile(r"Steps: 100%\|[^|]*\| (\d+)/\1 \[(\d+):(\d+)<")  # tqdm's last update of the training bar


def documentation() -> str:
    """README.md, then the pages of docs/ (sorted by path), as one text: where the runnable blocks and the quoted
    figures live. In this order the runnable blocks run as a reader meets them: the quickstart first."""
    return "\n".join(page.read_text() for page in (README, *sorted(DOCS.rglob("*.md"))))


def code_blocks(text: str) -> list[tuple[str, str, bool]]:
    """(language, code, marked runnable) of every fenced block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.fullmatch(r"```(\w*)", lines[i])
        if match:
            end = lines.index("```", i + 1)
            runnable = i > 0 and lines[i - 1].strip() == RUNNABLE
            blocks.append((match.group(1), "\n".join(lines[i + 1:end]), runnable))
            i = end
        i += 1
    return blocks


def commands(code: str) -> list[list[str]]:
    """The shell commands of a block as word lists (continuation lines joined, `&&` chains split)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in line.split("&&"):
            if part.strip():
                out.append(shlex.split(part))
    return out


def quickstart_commands(readme: str) -> dict[str, list[str]]:
    """{model: the training command's words after its environment assignments} of the README's runnable blocks."""
    found = {}
    for _, code, marked in code_blocks(readme):
        for words in commands(code) if marked else []:
            if "train_draftplus.py" in words:
                while "=" in words[0]:  # OMP_NUM_THREADS=1: set per run here
                    words = words[1:]
                found[words[words.index("--pretrained_model_name_or_path") + 1]] = words
    return found


def steps_seconds(stderr: str) -> int | None:
    """The training loop's own time, as its progress bar last showed it (whole seconds)."""
    matches = STEPS_BAR.findall(stderr)
    return int(matches[-1][1]) * 60 + int(matches[-1][2]) if matches else None


def runnable_tasks() -> int:
    """The tasks running or waiting for a CPU now, besides the one reading (the 4th field of /proc/loadavg)."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1


def spin() -> None:
    while True:
        pass


def run(words: list[str], threads: int, busy: int, scratch: Path) -> dict:
    """One run of a quickstart command; returns its times, how busy the machine was and its validation reward."""
    out = scratch / f"run-{time.monotonic_ns()}"
    words = [*words]
    words[words.index("--output_dir") + 1] = str(out)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    spinners = [subprocess.Popen([sys.executable, "-c", "from benchmarks.quickstart import spin; spin()"], cwd=ROOT)
                for _ in range(busy)]
    loads, done = [], threading.Event()

    def sample_load() -> None:
        while not done.wait(1.0):
            loads.append(runnable_tasks())

    sampler = threading.Thread(target=sample_load, daemon=True)
    try:
        time.sleep(2.0 if busy else 0.0)  # the spinners running before the clock starts
        sampler.start()
        start = time.perf_counter()
        result = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - start
    finally:
        done.set()
        for p in spinners:
            p.kill()
            p.wait()
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(words)} failed:\n{result.stderr[-3000:]}")
    validation = json.loads((out / "validation_reward.json").read_text())
    return {"threads": threads, "busy": busy, "wall_s": round(wall, 1), "steps_s": steps_seconds(result.stderr),
            "runnable": round(statistics.mean(loads), 2) if loads else None,
            "validation_before": validation["before"], "validation_after": validation["after"]}


def median_cell(runs: list[dict]) -> str:
    """The median wall time of some runs, and of their training loops."""
    wall = statistics.median(r["wall_s"] for r in runs)
    steps = [r["steps_s"] for r in runs if r["steps_s"] is not None]
    return f"{wall:.0f} s (the steps: {statistics.median(steps):.0f} s)" if steps else f"{wall:.0f} s"


def table(raw: dict, model: str) -> list[str]:
    """The timing table of one quickstart: a row per machine condition, a column per thread count (the README
    quotes it as it stands here)."""
    runs = [r for r in raw["runs"] if r["model"] == model]
    lines = ["| machine during the run (runnable tasks) | `OMP_NUM_THREADS=1` | `OMP_NUM_THREADS=2` |", "| --- | --- | --- |"]
    for busy in sorted({r["busy"] for r in runs}):
        these = [r for r in runs if r["busy"] == busy]
        load = [r["runnable"] for r in these if r["runnable"] is not None]
        where = ("idle" if busy == 0 else f"{busy} busy processes") + (f" ({min(load):.1f}-{max(load):.1f})" if load else "")
        lines.append(f"| {where} | " + " | ".join(median_cell([r for r in these if r["threads"] == t]) for t in (1, 2))
                     + " |")
    return lines


def summary(raw: dict, model: str) -> str:
    """One quickstart in a sentence: its validation reward and its time on the idle machine with 1 thread."""
    runs = [r for r in raw["runs"] if r["model"] == model]
    idle = [r for r in runs if (r["busy"], r["threads"]) == (0, 1)]
    return (f"validation reward {runs[0]['validation_before']:.3f} before -> {runs[0]['validation_after']:.3f} after "
            f"(8 fixed-seed images); {median_cell(idle)} on the idle machine with `OMP_NUM_THREADS=1`")


def report(raw: dict) -> str:
    lines = ["# The README's quickstarts on CPU", "",
             f"Machine: {raw['machine']}. Command: `{raw['command']}`; each condition {raw['repeats']}x, interleaved "
             "(medians). The whole command as printed in the README (imports, training, validation, end-of-run "
             "files); \"the steps\" is the training loop's own time from its progress bar; runnable tasks: the kernel's run "
             "queue sampled every second during the run (its mean per run; the range over runs).", ""]
    for model, words in raw["commands"].items():
        lines += [f"## `{model}`", "", f"`{shlex.join(words)}`", "", summary(raw, model) + ".", "", *table(raw, model), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--busy", type=int, default=2, help="Spinning processes in the busy condition.")
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    from benchmarks.endurance import machine

    found = quickstart_commands(documentation())
    raw = {"machine": machine().rsplit(",", 1)[0],  # its thread count is this process's, not the runs'
           "command": shlex.join(["python", "-m", "benchmarks.quickstart", *(argv if argv is not None else sys.argv[1:])]),
           "repeats": args.repeats, "commands": found, "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for model, words in found.items():
                for busy in (0, args.busy):
                    for threads in (1, 2):
                        row = {"model": model, "repeat": repeat, **run(words, threads, busy, Path(scratch))}
                        print(json.dumps(row), flush=True)
                        raw["runs"].append(row)
    out = Path(args.output_dir)
    (out / "quickstart_cpu.json").write_text(json.dumps(raw, indent=1) + "\n")
    (out / "quickstart_cpu.md").write_text(report(raw))
    print(report(raw))


if __name__ == "__main__":
    main()
