"""benchmarks/tradeoff.py's analysis on synthetic raw data: claims follow the paired statistics, an unmoved
run is no evidence, a collapsed one counts against, and --analyse_only rebuilds the report from raw data."""

import gzip
import json
import shutil

import numpy as np
import pytest

from benchmarks import tradeoff

P, S, STEPS = 24, 4, (5, 10)


def fake_raw(draftplus_diversity: float, kl_shift: float = 0.2, seed: int = 0) -> dict:
    """Base, DRaFT (kl 0) collapsing as its reward rises, and one DRaFT+ run (kl 0.1) whose final checkpoint
    reaches DRaFT's step-5 reward at `draftplus_diversity` x base diversity; kl 1 never moves."""
    rng = np.random.default_rng(seed)
    base_r, base_d = rng.normal(0.1, 0.2, (P, S)), rng.uniform(0.05, 0.15, P)

    def model(label, shift, scale, **meta):
        return {"label": label, "rewards": (base_r + shift + rng.normal(0, 0.005, (P, S))).tolist(),
                "diversities": (base_d * scale + rng.normal(0, 0.0005, P)).tolist(), **meta}

    models = [{"label": "base", "series": "base", "rewards": base_r.tolist(), "diversities": base_d.tolist()}]
    for kl, shifts, scales in ((0.0, (kl_shift, 2 * kl_shift), (0.6, 0.3)),
                               (0.1, (kl_shift / 2, kl_shift), (0.9, draftplus_diversity)),
                               (1.0, (0.0, 0.0), (1.0, 1.0))):
        for step, shift, scale in zip(STEPS, shifts, scales):
            models.append(model(f"kl_{kl:g}/checkpoint-{step}", shift, scale, series="checkpoint",
                                kl_coeff=kl, step=step))
    models.append(model("kl_0", 2 * kl_shift, 0.3, series="draft_final", kl_coeff=0.0, step=10))
    for scale in (0.25, 0.5, 0.75):
        models.append(model(f"kl_0@scale={scale:g}", 2 * kl_shift * scale, 1 - 0.7 * scale, series="scale",
                            lora_scale=scale))
    for name, frac in (("linear", 0.5), ("step_0.5", 0.3)):
        models.append(model(f"kl_0@aig={name}", 2 * kl_shift * frac, 1 - 0.5 * frac, series="aig", aig=name))
    settings = {"reward": "redness", "max_train_steps": 10, "train_batch_size": 4, "learning_rate": 0.02, "rank": 4,
                "num_inference_steps": 10, "guidance_scale": 5.0, "seed": 0, "eval_every": 5, "eval_seeds": S}
    runs = {k: [{"step": 10, "kl_penalty": 0.01, "reward": 0.1}] for k in ("0", "0.1", "1")}
    return {"settings": settings, "diversity_metric": "pixel_l2", "prompts": [f"p{i}" for i in range(P)],
            "runs": runs, "models": models, "command": "python -m benchmarks.tradeoff"}


def test_draftplus_that_keeps_diversity_holds_and_unmoved_run_is_excluded():
    result = tradeoff.analyse(fake_raw(draftplus_diversity=0.9))
    assert result["matched_reward"]["claim"]["holds"] is True
    by_kl = {r["kl_coeff"]: r for r in result["summary"]}
    assert by_kl[1.0]["reward_gain"]["verdict"] == 0  # kl 1 never moved ...
    assert result["matched_reward"]["per_kl"]["1"]["holds"] is None  # ... so it is no evidence either way
    assert all(r["status"] != "compared" for r in result["matched_reward"]["rows"] if r["label"].startswith("kl_1/"))
    # lower kl -> more reward, resolved for both neighbouring pairs
    assert [r["verdict"] for r in result["reward_order"]] == [1, 1]


def test_collapsed_draftplus_counts_against():
    result = tradeoff.analyse(fake_raw(draftplus_diversity=0.2))
    assert result["matched_reward"]["claim"]["holds"] is False
    assert result["matched_reward"]["claim"]["less"] >= 1


def test_controls_are_compared_at_matched_reward():
    result = tradeoff.analyse(fake_raw(draftplus_diversity=0.9))
    assert set(result["series"]) == {"kl", "scale", "aig"}
    assert len(result["controls"]) == 4 and all("leader" in r for r in result["controls"])


def test_analyse_only_rebuilds_every_table_and_figure_from_the_raw_file(tmp_path):
    raw = fake_raw(draftplus_diversity=0.9)
    with gzip.open(tmp_path / tradeoff.RAW_FILE, "wt") as f:
        json.dump(raw, f)
    tradeoff.main(["--analyse_only", "--output_dir", str(tmp_path)])
    text = (tmp_path / "tradeoff.md").read_text()
    assert "**holds**" in text and "Reward rises** beyond noise for 2 of 3 settings; not for kl_coeff 1." in text
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "tradeoff.json").read_text())["matched_reward"]["claim"]["holds"] is True


def test_the_leaders_conclusion_names_each_control_once_with_its_reward_levels():
    rows = [{"reward": 0.2167, "best": None}, {"reward": 0.284, "best": "aig"}, {"reward": 0.3513, "best": "aig"},
            {"reward": 0.4187, "best": "scale"}]
    text = tradeoff.leaders_conclusion(rows)
    assert text == (f"Beyond noise, the most diversity is kept by {tradeoff.SERIES_NAMES['aig']} at 2 of 4 reward "
                    f"levels (0.284, 0.351) and {tradeoff.SERIES_NAMES['scale']} at 1 of 4 reward levels (0.419); "
                    "at the other 1, no control leads beyond noise.")
    assert text.count(tradeoff.SERIES_NAMES["aig"]) == 1
    assert tradeoff.leaders_conclusion([{"reward": 0.2, "best": "aig"}]) == (
        f"{tradeoff.SERIES_NAMES['aig']} keeps the most diversity at every reward level, beyond noise.")
    assert "at any reward level" in tradeoff.leaders_conclusion([{"reward": 0.2, "best": None}])


def test_each_toy_writes_its_own_files_and_a_flow_report_names_its_toy_and_its_settings(tmp_path):
    """The flow toy's raw file and report sit beside the UNet toy's, never over them; its report says which toy it
    is, how it is re-run, and which settings differ from the UNet toy's run."""
    unet, flow = fake_raw(draftplus_diversity=0.9), fake_raw(draftplus_diversity=0.2, seed=1)
    flow["settings"].update(toy="toy-flow", learning_rate=0.002, kl_coeffs=[0.0, 0.1, 1.0], note="Fewer prompts.")
    for raw, toy in ((unet, tradeoff.UNET_TOY), (flow, tradeoff.TOYS["toy-flow"])):
        with gzip.open(tmp_path / toy.raw_file, "wt") as f:
            json.dump(raw, f)
    tradeoff.main(["--analyse_only", "--output_dir", str(tmp_path)])
    unet_files = {p.name: p.read_bytes() for p in tmp_path.glob("tradeoff.*")}
    tradeoff.main(["--toy", "toy-flow", "--analyse_only", "--output_dir", str(tmp_path)])
    assert {p.name: p.read_bytes() for p in tmp_path.glob("tradeoff.*")} == unet_files  # untouched
    text = (tmp_path / "tradeoff_flow.md").read_text()
    assert text.startswith("# DRaFT+ trade-off on the flow toy (toy-flow: SD3, rectified flow)")
    assert ("recomputed from `tradeoff_flow_raw.json.gz` by `python -m benchmarks.tradeoff --toy toy-flow "
            "--analyse_only`") in text
    assert "learning_rate 0.002 (UNet toy: 0.02)" in text and "kl_coeffs 0 0.1 1 (UNet toy: 0 0.003" in text
    assert "\n\nFewer prompts.\n\n" in text and "![reward vs diversity](tradeoff_flow.png)" in text
    assert "**does not hold**" in text and "On the flow toy:" in text
    assert json.loads((tmp_path / "tradeoff_flow.json").read_text())["matched_reward"]["claim"]["holds"] is False
    assert (tmp_path / "tradeoff_flow.png").stat().st_size > 10_000
    assert tradeoff.parse_args(["--toy", "toy-flow"]).kl_coeffs == list(tradeoff.TOYS["toy-flow"].kl_coeffs)
    assert tradeoff.parse_args(["--toy", "toy-flow"]).work_dir.endswith("tradeoff_flow")


def test_claim_verdicts_are_the_words_two_toys_are_compared_on():
    kept, collapsed = (tradeoff.claim_verdicts(tradeoff.analyse(fake_raw(d))) for d in (0.9, 0.2))
    assert kept["matched_reward"] == {"verdict": "holds",
                                      "evidence": "1 front points compared: 1 more, 0 less, 0 within noise"}
    assert collapsed["matched_reward"]["verdict"] == "does not hold"
    assert kept["reward_rises"] == {"verdict": "holds for some", "evidence": "2 of 3 kl_coeff settings beyond 2 SE"}
    assert kept["more_reward"]["verdict"] == "holds"
    rows = [{"verdict": v} for v in (1, -1, 0)]
    assert tradeoff._ordering_verdict(rows, 1) == ("holds with reversals",
                                                   "1 of 3 pairs beyond 2 SE, 1 reversed, 1 within noise")
    assert tradeoff._ordering_verdict(rows[2:], 1)[0] == "not resolved"
    assert tradeoff._ordering_verdict(rows[1:], -1)[0] == "holds where resolved"


@pytest.mark.parametrize("toy", list(tradeoff.TOYS))
def test_the_committed_tables_are_what_analyse_only_computes_from_the_committed_raw_data(toy, tmp_path):
    """Nothing in the committed trade-off results is edited by hand or left stale by a change to the analysis."""
    spec = tradeoff.TOYS[toy]
    shutil.copy(tradeoff.RESULTS / spec.raw_file, tmp_path / spec.raw_file)
    tradeoff.main(["--toy", toy, "--analyse_only", "--output_dir", str(tmp_path)])
    for suffix in (".md", ".json"):
        committed = (tradeoff.RESULTS / f"{spec.stem}{suffix}").read_text()
        assert (tmp_path / f"{spec.stem}{suffix}").read_text() == committed, f"{spec.stem}{suffix} is stale"
