"""The DRaFT+ trade-off on the pretrained toy: reward against diversity for several kl_coeff.

    python -m benchmarks.tradeoff          # ~4 minutes on 2 CPU cores

Trains one LoRA per kl_coeff (0 = plain DRaFT) for the same budget, keeping intermediate checkpoints,
evaluates the base model and every checkpoint on held-out seeds (mean reward; diversity = mean
pairwise LPIPS between the images of a prompt), and writes benchmarks/results/tradeoff.{json,md,png}.
It then checks, and reports whether or not they hold:
  1. reward rises over training for every setting;
  2. lower kl_coeff gives higher final reward and lower final diversity;
  3. at matched reward, DRaFT+ keeps more diversity than DRaFT: each DRaFT+ endpoint is compared with
     DRaFT's own training trajectory (base -> checkpoints) interpolated at the same reward.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train(model: str, kl: float, out: Path, args) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "train_draftplus.py"), "--pretrained_model_name_or_path", model,
           "--reward", args.reward, "--prompts", args.prompts, "--resolution", str(args.resolution),
           "--num_inference_steps", str(args.num_inference_steps), "--guidance_scale", str(args.guidance_scale),
           "--kl_coeff", str(kl), "--learning_rate", str(args.learning_rate), "--rank", str(args.rank),
           "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.max_train_steps),
           "--checkpointing_steps", str(args.eval_every), "--seed", str(args.seed), "--output_dir", str(out),
           "--report_to", "none"]
    if not (out / "pytorch_lora_weights.safetensors").exists():  # finished runs are reused
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def interpolate_diversity_at(trajectory: list[dict], reward: float) -> float | None:
    """Diversity of a trajectory (ordered points) where it first reaches `reward`, linearly interpolated."""
    for a, b in zip(trajectory, trajectory[1:]):
        lo, hi = sorted((a["reward_mean"], b["reward_mean"]))
        if lo <= reward <= hi and hi > lo:
            w = (reward - a["reward_mean"]) / (b["reward_mean"] - a["reward_mean"])
            return a["diversity"] + w * (b["diversity"] - a["diversity"])
    return None


def plot(trajectories: dict[float, list[dict]], base: dict, path: Path, metric: str, reward: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8), dpi=120)
    for kl, points in sorted(trajectories.items()):
        xs, ys = [p["diversity"] for p in points], [p["reward_mean"] for p in points]
        ax.plot(xs, ys, "-o", markersize=4, label=f"kl_coeff={kl:g}" + (" (DRaFT)" if kl == 0 else ""))
        ax.annotate(f"{kl:g}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.plot([base["diversity"]], [base["reward_mean"]], "k*", markersize=15, label="base model", zorder=5)
    ax.set_xlabel(f"diversity: mean pairwise {metric} per prompt")
    ax.set_ylabel(f"mean reward ({reward})")
    ax.set_title("DRaFT+ on the toy: training trajectories (base -> checkpoints)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", default="toy")
    p.add_argument("--kl_coeffs", type=float, nargs="+", default=[0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 1.0])
    p.add_argument("--reward", default="redness")
    p.add_argument("--prompts", default=str(ROOT / "assets" / "toy" / "prompts.txt"))
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num_inference_steps", type=int, default=10)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--learning_rate", type=float, default=2e-2)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--train_batch_size", type=int, default=4)
    p.add_argument("--max_train_steps", type=int, default=40)
    p.add_argument("--eval_every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_prompts", type=int, default=12, help="Evaluate on the first N prompts.")
    p.add_argument("--eval_seeds", type=int, default=6, help="Images per prompt (held-out seeds).")
    p.add_argument("--diversity_metric", default=None,
                   help="lpips (needs torchvision's AlexNet weights), or an explicit stand-in: "
                        "lpips_random_backbone / pixel_l2. Default: lpips if its weights are present, "
                        "else lpips_random_backbone (and the report says so).")
    p.add_argument("--work_dir", default=str(ROOT / "outputs" / "tradeoff"))
    p.add_argument("--output_dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    from utils.evaluate import _alexnet_weights_path, evaluate
    from utils.prompts import load_prompts

    model = args.pretrained_model_name_or_path
    if model == "toy":
        from utils.toy import build_toy_pipeline

        model = str(build_toy_pipeline())
    metric = args.diversity_metric or ("lpips" if _alexnet_weights_path().exists() else "lpips_random_backbone")
    work = Path(args.work_dir)

    runs = {}
    for kl in args.kl_coeffs:
        out = work / f"kl_{kl:g}"
        print(f"training kl_coeff={kl:g} -> {out}", flush=True)
        runs[kl] = {"dir": out, "metrics": train(model, kl, out, args)}

    steps = list(range(args.eval_every, args.max_train_steps + 1, args.eval_every))
    checkpoints = [(kl, s, run["dir"] / f"checkpoint-{s}") for kl, run in runs.items() for s in steps]
    prompts = load_prompts(args.prompts)[: args.eval_prompts]
    print(f"evaluating base + {len(checkpoints)} checkpoints on {len(prompts)} prompts x {args.eval_seeds} seeds "
          f"({metric})", flush=True)
    rows = evaluate(model, prompts, reward=args.reward, loras=[str(c) for _, _, c in checkpoints],
                    seeds_per_prompt=args.eval_seeds, num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale, resolution=args.resolution,
                    diversity_metric=metric, seed=10_000 + args.seed).rows  # seeds unseen in training
    base = rows[0]  # rows: base first, then the LoRAs in the order given
    trajectories = {kl: [dict(base, step=0)] for kl in runs}
    for (kl, step, _), row in zip(checkpoints, rows[1:], strict=True):
        trajectories[kl].append(dict(row, step=step))

    # 1. reward rises for every setting (held-out evaluation and the training log)
    summary = []
    for kl, points in trajectories.items():
        log = runs[kl]["metrics"]
        k = max(1, len(log) // 8)
        first, last = (sum(m["reward"] for m in log[:k]) / k, sum(m["reward"] for m in log[-k:]) / k)
        summary.append({"kl_coeff": kl, "final_reward": points[-1]["reward_mean"],
                        "reward_gain": points[-1]["reward_mean"] - base["reward_mean"],
                        "final_diversity": points[-1]["diversity"],
                        "diversity_ratio": points[-1]["diversity"] / base["diversity"],
                        "train_reward_first": first, "train_reward_last": last,
                        "final_kl_penalty": log[-1]["kl_penalty"]})
    # Judged on the held-out evaluation (same prompts and seeds for every checkpoint): the training log
    # compares different prompt batches, whose colours alone move the reward by more than training does.
    rises = {s["kl_coeff"]: s["reward_gain"] > 0 for s in summary}
    # 2. ordering in kl_coeff: strictly, and up to noise (a reversal smaller than two standard errors
    # of the difference counts as a tie)
    ordered = sorted(summary, key=lambda s: s["kl_coeff"])
    finals = {kl: points[-1] for kl, points in trajectories.items()}

    def sem(row, key):
        spread = row["reward_std"] if key == "reward_mean" else row["diversity_std"]
        count = row["num_images"] if key == "reward_mean" else row["num_prompts"]
        return spread / count**0.5

    def monotone(key, sign, tolerance):
        pairs = zip(ordered, ordered[1:])
        return all(sign * (finals[a["kl_coeff"]][key] - finals[b["kl_coeff"]][key])
                   >= -tolerance * (sem(finals[a["kl_coeff"]], key) ** 2 + sem(finals[b["kl_coeff"]], key) ** 2) ** 0.5
                   for a, b in pairs)

    reward_monotone, diversity_monotone = monotone("reward_mean", 1, 0), monotone("diversity", -1, 0)
    reward_monotone_noise, diversity_monotone_noise = monotone("reward_mean", 1, 2), monotone("diversity", -1, 2)
    # 3. matched reward
    matched = []
    if 0.0 in trajectories:
        for s in summary:
            if s["kl_coeff"] == 0:
                continue
            draft_div = interpolate_diversity_at(trajectories[0.0], s["final_reward"])
            matched.append({"kl_coeff": s["kl_coeff"], "reward": s["final_reward"],
                            "draftplus_diversity": s["final_diversity"], "draft_diversity_at_same_reward": draft_div,
                            "draftplus_keeps_more": None if draft_div is None else s["final_diversity"] > draft_div})

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(trajectories, base, out / "tradeoff.png", metric, args.reward)
    result = {"settings": {k: v for k, v in vars(args).items()}, "model": model, "diversity_metric": metric,
              "base": base, "summary": summary, "trajectories": {str(k): v for k, v in trajectories.items()},
              "checks": {"reward_rises": {str(k): v for k, v in rises.items()}, "reward_monotone": reward_monotone,
                         "diversity_monotone": diversity_monotone, "reward_monotone_within_2se": reward_monotone_noise,
                         "diversity_monotone_within_2se": diversity_monotone_noise, "matched_reward": matched}}
    (out / "tradeoff.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    stand_in = metric != "lpips"
    md = ["# DRaFT+ trade-off on the toy model", "",
          f"Command: `{' '.join(['python -m benchmarks.tradeoff', *sys.argv[1:]])}`  ",
          f"Training: reward `{args.reward}`, {args.max_train_steps} steps x batch {args.train_batch_size}, "
          f"lr {args.learning_rate}, rank {args.rank}, T={args.num_inference_steps}, guidance {args.guidance_scale}, "
          f"K=1, seed {args.seed}.  ",
          f"Evaluation: {len(prompts)} prompts x {args.eval_seeds} held-out seeds; diversity = mean pairwise "
          f"`{metric}` between the images of a prompt, averaged over prompts."]
    if stand_in:
        md += ["", f"**Diversity metric is a stand-in**: `{metric}`. torchvision's pretrained AlexNet weights "
               "cannot be downloaded on the machine that produced this file, so LPIPS runs with its shipped "
               "linear heads on a fixed randomly initialised AlexNet. Rerun with the real weights present for "
               "true LPIPS."]
    md += ["", "| kl_coeff | final reward | gain vs base | final diversity | diversity / base | "
           "train-batch reward first -> last 5 steps | final penalty |", "|---|---|---|---|---|---|---|",
           f"| base | {base['reward_mean']:.4f} | - | {base['diversity']:.4f} | 1.00 | - | - |"]
    md += [f"| {s['kl_coeff']:g}{' (DRaFT)' if s['kl_coeff'] == 0 else ''} | {s['final_reward']:.4f} | "
           f"{s['reward_gain']:+.4f} | {s['final_diversity']:.4f} | {s['diversity_ratio']:.2f} | "
           f"{s['train_reward_first']:.4f} -> {s['train_reward_last']:.4f} | {s['final_kl_penalty']:.2e} |"
           for s in ordered]
    md += ["", "Checks (computed by the script, not edited):", "",
           f"1. reward rises over training for every setting (held-out reward of the final checkpoint above "
           f"the base model's): **{all(rises.values())}** ({', '.join(f'{k:g}: {v}' for k, v in rises.items())})",
           f"2. lower kl_coeff -> higher final reward: strictly **{reward_monotone}**, within 2 standard errors "
           f"**{reward_monotone_noise}**; -> lower final diversity: strictly **{diversity_monotone}**, within 2 "
           f"standard errors **{diversity_monotone_noise}**",
           "3. at matched reward, DRaFT+ keeps more diversity than DRaFT (DRaFT's trajectory interpolated at "
           "each DRaFT+ endpoint's reward):", ""]
    for m in matched:
        if m["draft_diversity_at_same_reward"] is None:
            md.append(f"   - kl_coeff {m['kl_coeff']:g}: reward {m['reward']:.4f} is outside DRaFT's trajectory; "
                      "no comparison")
        else:
            md.append(f"   - kl_coeff {m['kl_coeff']:g}: reward {m['reward']:.4f}, diversity "
                      f"{m['draftplus_diversity']:.4f} vs DRaFT {m['draft_diversity_at_same_reward']:.4f} -> "
                      f"**{m['draftplus_keeps_more']}**")
    md += ["", "![reward vs diversity](tradeoff.png)", ""]
    (out / "tradeoff.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
