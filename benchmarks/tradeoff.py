"""The reward-diversity trade-off on a pretrained toy, with every post-hoc control on one plot.

    python -m benchmarks.tradeoff                  # the UNet toy: train, evaluate, analyse (~30 min on 2 CPU cores)
    python -m benchmarks.tradeoff --analyse_only   # recompute every table and figure from the raw data
    python -m benchmarks.tradeoff --toy toy-flow   # the same on the flow-matching toy (SD3 family)

1. Trains one LoRA per kl_coeff (0 = plain DRaFT) for the same budget, keeping a checkpoint every few steps.
2. Evaluates the base model, every checkpoint, and the DRaFT LoRA under two post-hoc controls (LoRA scale
   and annealed importance guidance, AIG) on the same prompts and the same initial noise (paired seeds,
   held out from training): per-image rewards and per-prompt diversities.
3. Writes the raw data (`tradeoff_raw.json.gz`: per-run training metrics, per-image rewards, per-prompt
   diversities) and, from that file alone, `tradeoff.md`, `tradeoff.json` and `tradeoff.png`; each toy has its
   own files (the flow toy's are `tradeoff_flow*`), so one toy's run never touches the other's results.

Every claim is decided by paired statistics (`benchmarks/stats.py`): a difference counts only beyond
2 paired standard errors, and a model whose reward did not move beyond noise is never evidence.

Why one module of ~500 lines: collecting, analysing and reporting all read the raw file's layout, which is
written down once here; the statistics themselves live in `benchmarks/stats.py`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stats import (  # noqa: E402
    Point,
    Z,
    claim_from,
    compare_fronts,
    diversity_change,
    ordering,
    pareto_front,
    reward_gain,
    series_at_rewards,
)

RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class ToyBenchmark:
    """One toy's trade-off benchmark: its model, its output files and the settings that differ between toys.

    The kl_coeff grid and learning rate are the toy's own because the penalty's scale is: on the flow toy the
    penalty compares velocity predictions, and DRaFT (kl_coeff 0) at the UNet toy's learning rate collapses
    within 5 steps, so a checkpoint every 5 steps would see nothing between the base and the collapse.
    """

    name: str  # --toy, and the model's --pretrained_model_name_or_path
    title: str  # what the report calls it
    stem: str  # output files: STEM.md, STEM.json, STEM.png, STEM_raw.json.gz
    kl_coeffs: tuple[float, ...]
    learning_rate: float

    @property
    def raw_file(self) -> str:
        return f"{self.stem}_raw.json.gz"

    @property
    def analyse_command(self) -> str:
        return "python -m benchmarks.tradeoff" + ("" if self.name == "toy" else f" --toy {self.name}") + " --analyse_only"


TOYS = {t.name: t for t in (
    ToyBenchmark("toy", "the toy model", "tradeoff", (0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0), 2e-2),
    ToyBenchmark("toy-flow", "the flow toy (toy-flow: SD3, rectified flow)", "tradeoff_flow",
                 (0.0, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), 2e-3),
)}
UNET_TOY = TOYS["toy"]
RAW_FILE = UNET_TOY.raw_file
SERIES_NAMES = {"kl": "kl_coeff sweep (final LoRAs)", "scale": "LoRA scale of the DRaFT LoRA",
                "aig": "AIG schedules of the DRaFT LoRA"}


# ----------------------------------------------------------------------------------------- collecting


def prompts_source(prompts: str) -> str:
    """A prompts file named relative to the repository (as the defaults are, so that no machine's path is
    recorded in the committed raw data) from wherever this runs; anything else as given."""
    return str(ROOT / prompts) if not Path(prompts).is_absolute() and (ROOT / prompts).is_file() else prompts


def train(model: str, kl: float, out: Path, args) -> list[dict]:
    from utils.lora import LORA_WEIGHTS_NAME
    from utils.run.output_dir import METRICS_NAME

    cmd = [sys.executable, str(ROOT / "train_draftplus.py"), "--pretrained_model_name_or_path", model,
           "--reward", args.reward, "--prompts", args.prompts, "--resolution", str(args.resolution),
           "--num_inference_steps", str(args.num_inference_steps), "--guidance_scale", str(args.guidance_scale),
           "--kl_coeff", str(kl), "--learning_rate", str(args.learning_rate), "--rank", str(args.rank),
           "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.max_train_steps),
           "--checkpointing_steps", str(args.eval_every), "--seed", str(args.seed), "--output_dir", str(out),
           "--report_to", "none"]
    if not (out / LORA_WEIGHTS_NAME).exists():  # finished runs are reused
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]


def collect(args) -> dict:
    """Train and evaluate; returns the raw data every table and figure is computed from."""
    from utils.evaluation.diversity import alexnet_weights_path
    from utils.evaluation.evaluate import evaluate
    from utils.prompts import load_prompts

    model = args.pretrained_model_name_or_path
    metric = args.diversity_metric or ("lpips" if alexnet_weights_path().exists() else "lpips_random_backbone")
    work = Path(args.work_dir)
    runs = {}
    for kl in args.kl_coeffs:
        out = work / f"kl_{kl:g}"
        print(f"training kl_coeff={kl:g} -> {out}", flush=True)
        runs[kl] = {"dir": out, "metrics": train(model, kl, out, args)}

    prompts = load_prompts(prompts_source(args.prompts))[: args.eval_prompts]
    steps = list(range(args.eval_every, args.max_train_steps + 1, args.eval_every))
    checkpoints = {str(run["dir"] / f"checkpoint-{s}"): (kl, s) for kl, run in runs.items() for s in steps}
    common = dict(reward=args.reward, seeds_per_prompt=args.eval_seeds, num_inference_steps=args.num_inference_steps,
                  guidance_scale=args.guidance_scale, resolution=args.resolution, diversity_metric=metric,
                  seed=10_000 + args.seed, batch_size=args.batch_size, log=print)  # seeds unseen in training
    print(f"evaluating base + {len(checkpoints)} checkpoints on {len(prompts)} prompts x {args.eval_seeds} seeds "
          f"({metric})", flush=True)
    trained = evaluate(model, prompts, loras=list(checkpoints), output_dir=work / "eval_checkpoints", **common)
    draft = runs[0.0]["dir"]
    print(f"evaluating the DRaFT LoRA at scales {args.lora_scales} and AIG schedules {args.aig}", flush=True)
    controls = evaluate(model, prompts, loras=[str(draft)], include_base=False, lora_scales=args.lora_scales,
                        aig=args.aig, output_dir=work / "eval_controls", **common)

    label_of = {row["path"]: row["model"] for row in trained.rows}
    meta = {"base": {"series": "base"}}
    for path, (kl, step) in checkpoints.items():
        meta[label_of[path]] = {"series": "checkpoint", "kl_coeff": kl, "step": step}
    for row in controls.rows:
        if row["control"] == "lora":
            meta[row["model"]] = {"series": "draft_final", "kl_coeff": 0.0, "step": args.max_train_steps}
        elif row["control"] == "scale":
            meta[row["model"]] = {"series": "scale", "lora_scale": float(row["lora_scale"])}
        else:
            meta[row["model"]] = {"series": "aig", "aig": row["aig_schedule"]}

    P, S = len(prompts), args.eval_seeds
    models = []
    for ev in (trained, controls):
        rewards = {row["model"]: np.full((P, S), np.nan) for row in ev.rows}
        diversities = {row["model"]: np.full(P, np.nan) for row in ev.rows}
        for r in ev.per_image:
            rewards[r["model"]][int(r["prompt_index"]), int(r["seed_index"])] = float(r["reward"])
        for r in ev.per_prompt:
            diversities[r["model"]][int(r["prompt_index"])] = float(r["diversity"])
        for row in ev.rows:
            assert not np.isnan(rewards[row["model"]]).any() and not np.isnan(diversities[row["model"]]).any()
            models.append({"label": row["model"], **meta[row["model"]],
                           "rewards": np.round(rewards[row["model"]], 6).tolist(),
                           "diversities": np.round(diversities[row["model"]], 6).tolist()})
    settings = {k: v for k, v in vars(args).items() if k not in ("work_dir", "output_dir", "analyse_only")}
    # Results name the repository's files from its root: no path of the machine that ran them.
    settings["prompts"] = str(settings["prompts"]).replace(f"{ROOT}/", "")
    return {"settings": settings, "diversity_metric": metric, "prompts": prompts,
            "runs": {f"{kl:g}": run["metrics"] for kl, run in runs.items()}, "models": models}


# ----------------------------------------------------------------------------------------- analysis


def points_of(raw: dict) -> dict[str, Point]:
    return {m["label"]: Point(m["label"], np.asarray(m["rewards"]), np.asarray(m["diversities"]),
                              {k: v for k, v in m.items() if k not in ("label", "rewards", "diversities")})
            for m in raw["models"]}


def analyse(raw: dict) -> dict:
    """Every table and check, from the raw data alone."""
    pts = points_of(raw)
    base = pts["base"]
    kls = sorted({p.meta["kl_coeff"] for p in pts.values() if p.meta["series"] == "checkpoint"})
    trajectories = {kl: [base] + sorted((p for p in pts.values() if p.meta["series"] == "checkpoint"
                                         and p.meta["kl_coeff"] == kl), key=lambda p: p.meta["step"])
                    for kl in kls}
    finals = {kl: traj[-1] for kl, traj in trajectories.items()}

    summary = []
    for kl in kls:
        p, log = finals[kl], raw["runs"][f"{kl:g}"]
        gain, div = reward_gain(p, base), diversity_change(p, base)
        summary.append({"kl_coeff": kl, "label": p.label, "step": p.meta["step"], "reward": p.reward,
                        "reward_gain": gain.as_dict(), "diversity": p.diversity,
                        "diversity_ratio": p.diversity / base.diversity, "diversity_change": div.as_dict(),
                        "final_kl_penalty": log[-1]["kl_penalty"]})
    by_kl = [finals[kl] for kl in kls]  # increasing kl_coeff
    reward_order = ordering(by_kl, "reward")  # +1: the lower kl_coeff has more reward
    diversity_order = ordering(by_kl, "diversity")  # -1: the lower kl_coeff has less diversity

    draft_traj = trajectories.get(0.0, [])
    draftplus_points = [p for kl, traj in trajectories.items() if kl > 0 for p in traj[1:]]
    front_rows = compare_fronts(draftplus_points, draft_traj[1:], base) if draft_traj else []
    per_kl_claims = {f"{kl:g}": claim_from(compare_fronts(trajectories[kl][1:], draft_traj[1:], base))
                     for kl in kls if kl > 0 and draft_traj}

    # Post-hoc controls of the DRaFT LoRA against the kl sweep: curves from the base to the DRaFT LoRA.
    draft_final = next((p for p in pts.values() if p.meta["series"] == "draft_final"), None)
    series = {}
    if draft_final is not None:
        sweep = sorted((finals[kl] for kl in kls if kl > 0), key=lambda p: p.reward)
        series = {
            "kl": [base, *sweep, draft_final],
            "scale": [base, *sorted((p for p in pts.values() if p.meta["series"] == "scale"),
                                    key=lambda p: p.meta["lora_scale"]), draft_final],
            "aig": [base, *sorted((p for p in pts.values() if p.meta["series"] == "aig"),
                                  key=lambda p: p.reward), draft_final],
        }
        top = draft_final.reward - base.reward
        levels = [base.reward + f * top for f in (0.2, 0.4, 0.6, 0.8)]
        controls = series_at_rewards(series, levels)
    else:
        controls = []
    return {"base": {"reward": base.reward, "diversity": base.diversity},
            "summary": summary, "reward_order": reward_order, "diversity_order": diversity_order,
            "matched_reward": {"rows": front_rows, "claim": claim_from(front_rows), "per_kl": per_kl_claims},
            "controls": controls,
            "series": {name: [p.label for p in curve] for name, curve in series.items()},
            "trajectories": {f"{kl:g}": [{"label": p.label, "step": p.meta.get("step", 0), "reward": p.reward,
                                          "diversity": p.diversity} for p in traj]
                             for kl, traj in trajectories.items()},
            "points": {p.label: {"reward": p.reward, "diversity": p.diversity, **p.meta} for p in pts.values()}}


# ----------------------------------------------------------------------------------------- reporting


def _diff(d: dict, digits: int = 4) -> str:
    return f"{d['mean']:+.{digits}f} ± {d['se']:.{digits}f}"


def _order_statement(rows: list[dict], want: int, what: str) -> str:
    resolved = [r for r in rows if r["verdict"] == want]
    reversed_ = [r for r in rows if r["verdict"] == -want]
    if len(resolved) == len(rows):
        return f"holds for every neighbouring pair of kl_coeff ({len(rows)} of {len(rows)} resolved beyond {Z:g} SE)"
    text = (f"holds where resolved: {len(resolved)} of {len(rows)} neighbouring pairs show {what} beyond {Z:g} SE, "
            f"{len(rows) - len(resolved) - len(reversed_)} are within noise")
    if reversed_:
        text += "; REVERSED beyond noise for " + ", ".join(f"{r['a']} vs {r['b']}" for r in reversed_)
    return text


def toy_of(raw: dict) -> ToyBenchmark:
    """The toy a raw file was measured on (files written before there were two toys: the UNet toy)."""
    return TOYS[raw["settings"].get("toy", UNET_TOY.name)]


def differences_from_unet_toy(settings: dict) -> list[str]:
    """The settings of a run that differ from the UNet toy's benchmark defaults, as `name value (UNet toy: value)`."""
    defaults = vars(parse_args([]))
    skip = {"toy", "pretrained_model_name_or_path", "prompts", "diversity_metric", "note"}
    return [f"{k} {_show(v)} (UNet toy: {_show(defaults[k])})" for k, v in settings.items()
            if k in defaults and k not in skip and _show(v) != _show(defaults[k])]


def _show(value) -> str:
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, list | tuple) \
        else (f"{value:g}" if isinstance(value, float) else str(value))


def report(raw: dict, result: dict, command: str) -> str:
    s = raw["settings"]
    metric = raw["diversity_metric"]
    base = result["base"]
    toy = toy_of(raw)
    lines = [f"# DRaFT+ trade-off on {toy.title}", "",
             f"Command: `{command}` (the tables below are recomputed from `{toy.raw_file}` by "
             f"`{toy.analyse_command}`).  ",
             f"Training: reward `{s['reward']}`, {s['max_train_steps']} steps x batch {s['train_batch_size']}, "
             f"lr {s['learning_rate']}, rank {s['rank']}, T={s['num_inference_steps']}, guidance {s['guidance_scale']}, "
             f"K=1, final x0 decoded, seed {s['seed']}, a checkpoint every {s['eval_every']} steps.  ",
             f"Evaluation: {len(raw['prompts'])} prompts x {s['eval_seeds']} held-out seeds, the same initial noise "
             f"for every model; diversity = mean pairwise `{metric}` between the images of a prompt. Differences are "
             f"paired (per image for rewards, per prompt for diversity) and written as mean ± standard error; a "
             f"difference counts beyond {Z:g} SE."]
    if toy is not UNET_TOY:
        lines += ["", f"Settings that differ from the UNet toy's run: {'; '.join(differences_from_unet_toy(s)) or 'none'}."]
    if s.get("note"):
        lines += ["", s["note"]]
    if metric == "lpips_random_backbone":
        lines += ["", f"**Diversity metric is a stand-in**: `{metric}`. torchvision's pretrained AlexNet weights "
                  "cannot be downloaded on the machine that produced this file, so LPIPS runs with its shipped "
                  "linear heads on a fixed randomly initialised AlexNet. Rerun with the real weights present for "
                  "true LPIPS."]
    elif metric != "lpips":
        lines += ["", f"**Diversity metric is a stand-in**: `{metric}`, not the LPIPS of the DRaFT+ paper."]
    lines += ["", "## Final LoRAs against the base model", "",
              "| kl_coeff | reward | reward gain vs base | moved? | diversity | diversity change vs base | "
              "diversity / base | final penalty |", "|---|---|---|---|---|---|---|---|",
              f"| base | {base['reward']:.4f} | - | - | {base['diversity']:.4f} | - | 1.00 | - |"]
    for r in result["summary"]:
        moved = {1: "yes", 0: "no (within noise)", -1: "down"}[r["reward_gain"]["verdict"]]
        lines.append(f"| {r['kl_coeff']:g}{' (DRaFT)' if r['kl_coeff'] == 0 else ''} | {r['reward']:.4f} | "
                     f"{_diff(r['reward_gain'])} | {moved} | {r['diversity']:.4f} | {_diff(r['diversity_change'])} | "
                     f"{r['diversity_ratio']:.2f} | {r['final_kl_penalty']:.2e} |")
    rises = [r for r in result["summary"] if r["reward_gain"]["verdict"] == 1]
    unmoved = ", ".join(f"{r['kl_coeff']:g}" for r in result["summary"] if r["reward_gain"]["verdict"] != 1)
    lines += ["", "## Claims, as strongly as the statistics allow", "",
              f"1. **Reward rises** beyond noise for {len(rises)} of {len(result['summary'])} settings"
              + (f"; not for kl_coeff {unmoved}." if unmoved else "."),
              f"2. **Lower kl_coeff gives more reward**: {_order_statement(result['reward_order'], 1, 'more reward')}.",
              f"3. **Lower kl_coeff gives less diversity**: "
              f"{_order_statement(result['diversity_order'], -1, 'less diversity')}."]
    claim = result["matched_reward"]["claim"]
    plain = {True: "holds", False: "does not hold", None: "cannot be decided (nothing comparable)"}
    verdict = {k: f"**{v}**" for k, v in plain.items()}
    lines += [f"4. **At matched reward, DRaFT+ keeps more diversity than DRaFT** (the Pareto front of all DRaFT+ "
              f"checkpoints against DRaFT's, at rewards both reached with a significant gain): {verdict[claim['holds']]}"
              f" - front points compared: {claim['compared']}; {claim['more']} more, {claim['less']} less, "
              f"{claim['ties']} within noise."]
    lines += ["", "| DRaFT+ front point | reward gain vs base | diversity | DRaFT front at that reward | "
              "diversity difference | verdict |", "|---|---|---|---|---|---|"]
    for r in result["matched_reward"]["rows"]:
        if r["status"] == "compared":
            lines.append(f"| {r['label']} | {_diff(r['reward_gain'])} | {r['diversity']:.4f} | "
                         f"{r['reference_diversity']:.4f} | {_diff(r['diversity_difference'])} | {r['verdict']} |")
        else:
            lines.append(f"| {r['label']} | {_diff(r['reward_gain'])} | {r['diversity']:.4f} | - | - | {r['status']} |")
    if result["matched_reward"]["per_kl"]:
        lines += ["", "Per kl_coeff (its own checkpoints' front against DRaFT's): " + "; ".join(
            f"{kl}: {plain[c['holds']]} ({c['more']} more, {c['less']} less, {c['ties']} ties)"
            for kl, c in result["matched_reward"]["per_kl"].items()) + "."]
    if result["controls"]:
        lines += ["", "## Which control keeps the most diversity at matched reward", "",
                  "Three ways from the base model to the DRaFT (kl_coeff 0) LoRA, compared at rewards 20-80% of the "
                  "way: " + "; ".join(f"{SERIES_NAMES[k]}: {' -> '.join(v)}" for k, v in result["series"].items()) + ".",
                  "", "| reward | " + " | ".join(SERIES_NAMES[k] for k in result["series"]) + " | leader | resolved? |",
                  "|---" * (len(result["series"]) + 3) + "|"]
        for row in result["controls"]:
            cells = [f"{row['diversity'][k]:.4f}" if k in row["diversity"] else "-" for k in result["series"]]
            vs = "; ".join(f"vs {SERIES_NAMES[k].split(' ')[0]} {_diff(d)}" for k, d in row.get("leader_vs", {}).items())
            lead = SERIES_NAMES[row["leader"]] if row.get("leader") else "-"
            lines.append(f"| {row['reward']:.4f} | " + " | ".join(cells) + f" | {lead} | "
                         f"{'yes' if row.get('best') else 'no'} ({vs}) |")
        where = "the toy" if toy is UNET_TOY else "the flow toy"
        lines += ["", f"On {where}: {leaders_conclusion(result['controls'])} Jena et al. (WACV 2025) report that "
                  "AIG beats both KL and LoRA "
                  "scaling (SDXL, real rewards); this is what the toy shows, and it need not transfer."]
    lines += ["", f"![reward vs diversity]({toy.stem}.png)", ""]
    return "\n".join(lines)


def levels_led(controls: list[dict]) -> dict[str, list[float]]:
    """{control: the reward levels at which it keeps the most diversity beyond noise}, in order of first lead."""
    levels: dict[str, list[float]] = {}
    for row in controls:
        if row.get("best"):
            levels.setdefault(row["best"], []).append(row["reward"])
    return levels


def leaders_conclusion(controls: list[dict]) -> str:
    """Which control keeps the most diversity beyond noise, and at which reward levels: each control named
    once, with its levels; the levels where no control leads beyond noise counted apart."""
    levels = {series: [f"{reward:.3f}" for reward in rewards] for series, rewards in levels_led(controls).items()}
    resolved = sum(len(v) for v in levels.values())
    if not resolved:
        return "No control keeps more diversity than the others beyond noise at any reward level."
    if resolved == len(controls) and len(levels) == 1:
        return f"{SERIES_NAMES[next(iter(levels))]} keeps the most diversity at every reward level, beyond noise."
    parts = [f"{SERIES_NAMES[series]} at {len(v)} of {len(controls)} reward levels ({', '.join(v)})"
             for series, v in levels.items()]
    rest = len(controls) - resolved
    return ("Beyond noise, the most diversity is kept by " + " and ".join(parts)
            + (f"; at the other {rest}, no control leads beyond noise." if rest else "."))


CLAIMS = {
    "reward_rises": "Reward rises (final LoRAs against the base)",
    "more_reward": "Lower kl_coeff gives more reward (neighbouring kl_coeff)",
    "less_diversity": "Lower kl_coeff gives less diversity (neighbouring kl_coeff)",
    "matched_reward": "At matched reward, DRaFT+ keeps more diversity than DRaFT",
    "controls": "The post-hoc control that keeps the most diversity at matched reward",
}
CONTROL_NAMES = {"kl": "the kl_coeff sweep", "scale": "LoRA scale", "aig": "AIG"}


def _ordering_verdict(rows: list[dict], want: int) -> tuple[str, str]:
    held = sum(r["verdict"] == want for r in rows)
    against = sum(r["verdict"] == -want for r in rows)
    verdict = ("holds" if held == len(rows) else "holds where resolved" if held and not against
               else "holds with reversals" if held else "reversed" if against else "not resolved")
    return verdict, (f"{held} of {len(rows)} pairs beyond {Z:g} SE" + (f", {against} reversed" if against else "")
                     + (f", {len(rows) - held - against} within noise" if len(rows) - held - against else ""))


def claim_verdicts(result: dict) -> dict[str, dict[str, str]]:
    """Each claim of `CLAIMS` as {"verdict": a phrase two toys' results are compared on, "evidence": the counts
    behind it}, from an `analyse` result (or a tradeoff.json, which holds one)."""
    n = len(result["summary"])
    rises = sum(r["reward_gain"]["verdict"] == 1 for r in result["summary"])
    verdicts = {"reward_rises": {"verdict": "holds" if rises == n else "holds for some" if rises else "does not hold",
                                 "evidence": f"{rises} of {n} kl_coeff settings beyond {Z:g} SE"}}
    for key, rows, want in (("more_reward", result["reward_order"], 1), ("less_diversity", result["diversity_order"], -1)):
        verdict, evidence = _ordering_verdict(rows, want)
        verdicts[key] = {"verdict": verdict, "evidence": evidence}
    claim = result["matched_reward"]["claim"]
    verdicts["matched_reward"] = {
        "verdict": {True: "holds", False: "does not hold", None: "cannot be decided"}[claim["holds"]],
        "evidence": f"{claim['compared']} front points compared: {claim['more']} more, {claim['less']} less, "
                    f"{claim['ties']} within noise"}
    levels = {series: len(rewards) for series, rewards in levels_led(result["controls"]).items()}
    verdicts["controls"] = {
        "verdict": " and ".join(CONTROL_NAMES[k] for k in sorted(levels)) or "none beyond noise",
        "evidence": (", ".join(f"{CONTROL_NAMES[k]} leads at {v}" for k, v in sorted(levels.items())) or "no lead")
                    + f" of {len(result['controls'])} reward levels beyond {Z:g} SE"}
    return verdicts


def plot(raw: dict, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    base = result["base"]
    for kl, traj in result["trajectories"].items():
        ax.plot([p["diversity"] for p in traj], [p["reward"] for p in traj], "-o", markersize=3, alpha=0.8,
                label=f"kl_coeff={kl}" + (" (DRaFT)" if kl == "0" else ""))
    pts = points_of(raw)
    for name, members, style in (("DRaFT+ front", [p for p in pts.values() if p.meta["series"] == "checkpoint"
                                                   and p.meta["kl_coeff"] > 0], "k--"),
                                 ("DRaFT front", [p for p in pts.values() if p.meta["series"] == "checkpoint"
                                                  and p.meta["kl_coeff"] == 0], "r:")):
        front = pareto_front(members)
        ax.plot([p.diversity for p in front], [p.reward for p in front], style, linewidth=2, label=name)
    for a in (ax, bx):
        a.plot([base["diversity"]], [base["reward"]], "k*", markersize=14, label="base model", zorder=5)
        a.set_xlabel(f"diversity: mean pairwise {raw['diversity_metric']} per prompt")
        a.set_ylabel(f"mean reward ({raw['settings']['reward']})")
        a.grid(alpha=0.3)
    ax.set_title("training trajectories (base -> checkpoints) and Pareto fronts")
    for name, labels in result["series"].items():
        curve = [result["points"][label] for label in labels]
        bx.plot([p["diversity"] for p in curve], [p["reward"] for p in curve], "-o", markersize=4,
                label=SERIES_NAMES[name])
    bx.set_title("post-hoc controls vs kl_coeff (base -> DRaFT LoRA)")
    ax.legend(fontsize=7)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(raw: dict, out: Path, command: str) -> dict:
    result = analyse(raw)
    stem = toy_of(raw).stem
    out.mkdir(parents=True, exist_ok=True)
    plot(raw, result, out / f"{stem}.png")
    (out / f"{stem}.json").write_text(json.dumps({"settings": raw["settings"], "diversity_metric":
                                                  raw["diversity_metric"], **result}, indent=1, default=str) + "\n")
    text = report(raw, result, command)
    (out / f"{stem}.md").write_text(text)
    return result


def read_raw(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; `--toy` picks the model, the output files and the defaults that differ between toys."""
    toy_parser = argparse.ArgumentParser(add_help=False)
    toy_parser.add_argument("--toy", choices=list(TOYS), default=UNET_TOY.name)
    toy = TOYS[toy_parser.parse_known_args(argv)[0].toy]
    p = argparse.ArgumentParser(prog="python -m benchmarks.tradeoff", description=__doc__.split("\n\n")[0],
                                parents=[toy_parser])
    p.add_argument("--analyse_only", action="store_true",
                   help="Recompute the tables and the figure from the toy's raw file (tradeoff_raw.json.gz, "
                        "tradeoff_flow_raw.json.gz) in --output_dir (no training).")
    p.add_argument("--pretrained_model_name_or_path", default=toy.name)
    p.add_argument("--kl_coeffs", type=float, nargs="+", default=list(toy.kl_coeffs))
    p.add_argument("--lora_scales", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8])
    p.add_argument("--aig", nargs="+", default=["linear", "power_2", "power_4", "step_0.5", "step_0.7", "step_0.9"])
    p.add_argument("--reward", default="redness")
    p.add_argument("--prompts", default=f"assets/{toy.name}/prompts.txt",
                   help="A prompts file (relative to the repository root or absolute) or a built-in prompt set.")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num_inference_steps", type=int, default=10)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--learning_rate", type=float, default=toy.learning_rate)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--max_train_steps", type=int, default=40)
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_prompts", type=int, default=36, help="Evaluate on the first N prompts.")
    p.add_argument("--eval_seeds", type=int, default=6, help="Images per prompt (held-out seeds).")
    p.add_argument("--batch_size", type=int, default=54, help="Images per evaluation pipeline call.")
    p.add_argument("--diversity_metric", default=None,
                   help="lpips (needs torchvision's AlexNet weights), or an explicit stand-in: "
                        "lpips_random_backbone / pixel_l2. Default: lpips if its weights are present, "
                        "else lpips_random_backbone (and the report says so).")
    p.add_argument("--note", default=None, help="A paragraph for the report: why settings differ, what was reduced.")
    p.add_argument("--work_dir", default=str(ROOT / "outputs" / toy.stem))
    p.add_argument("--output_dir", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    toy = TOYS[args.toy]
    out = Path(args.output_dir)
    if args.analyse_only:
        raw = read_raw(out / toy.raw_file)
    else:
        raw = collect(args)  # the training logs (per-step rewards, penalties) are in it too
        raw["command"] = shlex.join(["python", "-m", "benchmarks.tradeoff", *(argv if argv is not None else sys.argv[1:])])
        out.mkdir(parents=True, exist_ok=True)
        with gzip.open(out / toy.raw_file, "wt") as f:
            json.dump(raw, f)
    write(raw, out, raw["command"])
    print((out / f"{toy.stem}.md").read_text())


if __name__ == "__main__":
    main()
