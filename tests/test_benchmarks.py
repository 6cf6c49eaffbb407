"""benchmarks/: the speed/memory script on the toy (small settings), the trade-off helpers, the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def speed_memory(out, *extra, stem="speed_memory_toy_cpu"):
    cmd = [sys.executable, "-m", "benchmarks.speed_memory", "--steps", "3", "--repeats", "1", "--warmup", "1",
           "--batch_sizes", "2", "--memory_steps", "2", "6", "--memory_truncations", "1", "2",
           "--compile_backend", "aot_eager", "--output_dir", str(out), *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / f"{stem}.json").read_text())


@pytest.mark.slow
def test_speed_memory_on_the_toy_four_sides_compiled_equal_eager_memory_flat_in_t(tmp_path):
    from benchmarks.speed_memory import SIDES

    results = speed_memory(tmp_path)
    (timing,) = results["timing"]
    assert (timing["T"], timing["batch_size"]) == (3, 2) and not timing.get("recompiled")
    assert set(timing["median_s"]) == set(SIDES) and all(v > 0 for v in timing["median_s"].values())
    # The compiled sides compile their graphs in the first calls (adapters on, adapters off, the plain
    # pipeline's UNet), and give the eager results (aot_eager: same aten graph).
    (compiled,) = results["compile"]
    assert compiled["graphs"] == 3 and compiled["first_call_s"]["train_compiled"] > 0
    (numerics,) = results["numerics"]
    assert set(numerics) >= {"train_images_max_abs", "train_lora_grad_rel", "pipeline_images_max_abs"}
    assert all(numerics[k] < 1e-5 for k in numerics if k not in ("batch_size", "T"))
    # The no-grad prefix keeps nothing for backward, eager or compiled: the same bytes at T=2 and T=6.
    by_t = {(r["path"], r["T"]): r["saved_bytes"] for r in results["activation_bytes_vs_T"]}
    assert by_t[("train", 2)] == by_t[("train", 6)] == by_t[("train_compiled", 2)] == by_t[("train_compiled", 6)] > 0
    by_k = {(r["K"], r["gradient_checkpointing"]): r["saved_bytes"] for r in results["activation_bytes_vs_K"]}
    assert by_k[(2, False)] > by_k[(1, False)] > by_k[(1, True)]  # grows with K; checkpointing saves memory
    assert by_k[(2, True)] < by_k[(2, False)]
    profiles = {p["path"]: {r["region"] for r in p["regions"]} for p in results["profile"]}
    assert set(profiles) == {"train", "train_compiled"}
    for regions in profiles.values():
        assert {"draftplus/no_grad_prefix", "draftplus/graded_step", "draftplus/reference_pass",
                "draftplus/vae_decode", "draftplus/reward", "draftplus/backward"} <= regions
    report = (tmp_path / "speed_memory_toy_cpu.md").read_text()
    assert "| 2 | 3 | False |" in report and "pipeline, plain UNet, compiled" in report
    assert "pipeline, LoRA-wrapped UNet, eager" in report and "## Profile of one training sample, --compile" in report

    # Re-measuring one section keeps the others; timing at another batch size adds rows; commands are recorded.
    again = speed_memory(tmp_path, "--sections", "timing", "--batch_sizes", "1", "--sides", "train", "pipeline")
    assert again["activation_bytes_vs_T"] == results["activation_bytes_vs_T"]
    assert [(r["batch_size"], sorted(r["median_s"])) for r in again["timing"]] == [
        (2, sorted(SIDES)), (1, ["pipeline", "train"])]
    assert [c["sections"] for c in again["commands"]] == [["timing", "peak", "memory", "profile"], ["timing"]]


@pytest.mark.slow
def test_gpu_benchmark_entry_points_run_on_tiny_shapes(tmp_path):
    """--sdxl --smoke: the SDXL-size builders (real block structure at tiny widths), the PickScore code path, the
    plain pipeline copy and the report, end to end on CPU: what benchmarks/gpu_checks.sh runs at full size."""
    results = speed_memory(tmp_path, "--sdxl", "--smoke", "--sections", "timing", "--sides", "train", "pipeline",
                           "--batch_sizes", "1", "--gradient_checkpointing", stem="speed_memory_sdxl_smoke_cpu")
    (row,) = results["timing"]
    assert results["image_size"] == 64 and row["gradient_checkpointing"] and set(row["median_s"]) == {"train",
                                                                                                      "pipeline"}
    assert "Smoke run" in (tmp_path / "speed_memory_sdxl_smoke_cpu.md").read_text()


def test_plain_unet_has_no_peft_layers_and_the_base_weights():
    import torch

    from benchmarks.speed_memory import plain_unet_of
    from utils.lora import adapters_disabled, add_lora
    from utils.toys.tiny_models import build_random_pipeline

    unet = build_random_pipeline(seed=0).unet
    add_lora(unet, rank=4)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    plain = plain_unet_of(unet)
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_parameters())
    x, t, ehs = torch.randn(1, 4, 16, 16), torch.tensor(10), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), adapters_disabled(unet):
        torch.testing.assert_close(plain(x, t, ehs).sample, unet(x, t, ehs).sample, rtol=0, atol=0)
    assert any("lora_A" in n for n, _ in unet.named_parameters())  # the trainer's UNet keeps its adapter


def test_report_assembles_the_sections_it_finds(tmp_path, monkeypatch):
    from benchmarks import report

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tradeoff.md").write_text("# Trade-off\n\nbody ![plot](tradeoff.png)\n")
    (tmp_path / "results" / "tradeoff_flow.md").write_text("# Flow trade-off\n\nbody ![plot](tradeoff_flow.png)\n")
    for run, rewards, validation in (("kl0.01", [0.1 * i for i in range(1, 11)], (0.1, 0.25)),
                                     ("kl0.01_fp32", [0.2] * 10, (0.3, 0.2))):
        (tmp_path / "results" / f"gpu_train_toy_{run}_metrics.jsonl").write_text(
            "\n".join(json.dumps({"step": i, "reward": r}) for i, r in enumerate(rewards, 1)))
        (tmp_path / "results" / f"gpu_train_toy_{run}_validation.json").write_text(json.dumps(
            {"before": validation[0], "after": validation[1], "prompts": ["a", "b"], "images_per_prompt": 16}))
    (tmp_path / "results" / "gpu_train_toy_kl0.01_command.txt").write_text("train_draftplus.py --kl_coeff 0.01\n")
    monkeypatch.setattr(report, "HERE", tmp_path)
    report.main([])
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Trade-off" in text and "](results/tradeoff.png)" in text
    assert text.index("## Trade-off") < text.index("## Flow trade-off") < text.index("## Trainer on a GPU")
    assert "](results/tradeoff_flow.png)" in text
    assert "| kl0.01 | 10 | 0.3000 -> 0.8000 | 32 | 0.1000 -> 0.2500 | True |" in text
    assert "| kl0.01_fp32 | 10 | 0.2000 -> 0.2000 | 32 | 0.3000 -> 0.2000 | False |" in text
    assert "- kl0.01: `train_draftplus.py --kl_coeff 0.01`" in text
    assert "Not measured yet: `quickstart_cpu.md`, `speed_memory_toy_cpu.md`, `speed_memory_sd15_cuda.md` (needs a GPU" in text
    assert "`speed_memory_sdxl_cuda.md` (needs a GPU: `python -m benchmarks.speed_memory --sdxl" in text


def test_saved_activation_bytes_excludes_weights_and_frees_the_graph():
    import gc
    import weakref

    import torch

    from benchmarks.speed_memory import saved_activation_bytes

    layer = torch.nn.Linear(100, 100).requires_grad_(False)
    x = torch.randn(8, 100, requires_grad=True)
    outputs = []

    def fn():
        h = layer(x).exp()  # linear saves its (frozen) weight, exp its own output
        outputs.append(weakref.ref(h))
        return h.sum()

    assert saved_activation_bytes(fn, [layer]) == 8 * 100 * 4  # the exp output only
    gc.collect()
    assert outputs[0]() is None  # measuring must not keep the graph (and its activations) alive


def test_readme_summary_is_generated_from_the_committed_results():
    """No hand-typed figure: the README's benchmark block is exactly what report.py computes from the results."""
    from benchmarks.report import BEGIN, END, HERE, SUMMARY_PAGE, readme_summary

    text = (HERE.parent / SUMMARY_PAGE).read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END == readme_summary()
    assert "tradeoff" in readme_summary().lower() or "Trade-off" in readme_summary()


def test_report_puts_the_toys_claims_side_by_side_and_says_where_they_differ(tmp_path, monkeypatch):
    from test_tradeoff import fake_raw

    from benchmarks import report, tradeoff

    results = tmp_path / "results"
    kept, collapsed = fake_raw(draftplus_diversity=0.9), fake_raw(draftplus_diversity=0.2, seed=1)
    collapsed["settings"]["toy"] = "toy-flow"
    tradeoff.write(kept, results, "python -m benchmarks.tradeoff")
    assert report.toys_side_by_side(results) is None and report.toy_differences(results) is None  # one toy only
    tradeoff.write(collapsed, results, "python -m benchmarks.tradeoff --toy toy-flow")
    monkeypatch.setattr(report, "HERE", tmp_path)
    report.main([])
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.index("# DRaFT+ trade-off on the flow toy") < text.index("## The DRaFT+ claims on both toys")
    assert "| claim | UNet toy (`toy`) | flow toy (`toy-flow`) | |" in text
    assert ("| At matched reward, DRaFT+ keeps more diversity than DRaFT | holds (1 front points compared: 1 more, "
            "0 less, 0 within noise) | does not hold (") in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["Reward rises (final LoRAs against the base)"].endswith("| agree |")  # both: 2 of 3
    assert rows["At matched reward, DRaFT+ keeps more diversity than DRaFT"].endswith("| **differ** |")
    differences = report.toy_differences(results)
    assert sum(line.endswith("| **differ** |") for line in rows.values()) == len(differences) >= 1
    assert ('"At matched reward, DRaFT+ keeps more diversity than DRaFT" (UNet toy: holds; flow toy: does not hold)'
            in differences)
    assert "Where the toys differ: " + "; ".join(differences) + "." in text
    summary = report.readme_summary(results)
    assert "- Trade-off on the toy (" in summary and "- Trade-off on the flow toy (" in summary
    assert "- UNet toy vs flow toy: they differ on " + "; ".join(differences) + "." in summary
    tradeoff.write(kept | {"settings": {**kept["settings"], "toy": "toy-flow"}}, results, "same as the UNet toy")
    assert report.toy_differences(results) == [] and "The toys agree on every claim." in report.toys_side_by_side(results)


def test_flow_memory_builds_the_real_models_from_their_configs():
    """The parameter counts of the real SD3.5-Medium and FLUX.1-dev components (built on the meta device)."""
    import torch

    from benchmarks.flow_memory import build_pipeline

    counts = {}
    for model in ("sd35m", "flux1dev"):
        pipe = build_pipeline(model, torch.device("meta"), torch.bfloat16)
        counts[model] = {name: sum(p.numel() for p in c.parameters()) for name, c in pipe.components.items()
                         if isinstance(c, torch.nn.Module)}
    assert counts["flux1dev"] == {"transformer": 11_901_408_320, "text_encoder": 123_060_480,  # CLIP-L
                                  "text_encoder_2": 4_762_310_656, "vae": 83_819_683}  # T5-XXL encoder
    assert counts["sd35m"] == {"transformer": 2_243_171_520, "text_encoder": 123_650_304,  # CLIP-L + projection
                               "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656,  # CLIP-G, T5-XXL
                               "vae": 83_819_683}


def test_flow_memory_smoke_runs_the_sd35_and_the_4bit_flux_code_paths(tmp_path):
    """--smoke: what benchmarks/gpu_checks.sh's sd35m_mem and flux_nf4_mem stages run at full size, on CPU at tiny
    widths (bitsandbytes' 4-bit layers run on CPU): a training sample and the pipeline, timed, and the report."""
    from benchmarks.flow_memory import main

    for model, extra, stem in (("sd35m", [], "flow_memory_sd35m_smoke_cpu"),
                               ("flux1dev", ["--quantize_base", "nf4"], "flow_memory_flux1dev_nf4_smoke_cpu")):
        results = main(["--model", model, *extra, "--smoke", "--device", "cpu", "--steps", "2", "--repeats", "1",
                        "--output_dir", str(tmp_path)])
        assert json.loads((tmp_path / f"{stem}.json").read_text()) == json.loads(json.dumps(results))
        assert (results["image_size"], results["T"], results["batch_size"], results["K"]) == (64, 2, 1, 1)
        assert results["median_s"]["train"] > 0 and results["median_s"]["pipeline"] > 0
        assert "peak_reserved_bytes" not in results  # no CUDA: unmeasured, and the report says so
        report = (tmp_path / f"{stem}.md").read_text()
        assert "Smoke run" in report and "Peak GPU memory: not measured" in report
    assert results["goal_gb"] == 24 and results["quantized_layers"] > 0  # the 4-bit path ran


def test_quickstart_benchmark_runs_the_readmes_commands_and_tables_each_condition():
    from benchmarks import quickstart

    found = quickstart.quickstart_commands(quickstart.documentation())
    assert set(found) == {"toy", "toy-flow"}
    for words in found.values():  # as printed, without the environment assignment the benchmark sets per run
        assert words[:2] == ["accelerate", "launch"] and "train_draftplus.py" in words and "--output_dir" in words
    bar = "Steps:  50%|#    | 20/40 [00:07<00:07]\rSteps: 100%|#####| 40/40 [01:13<00:00,  2.87it/s, kl=0.4]"
    assert quickstart.steps_seconds(bar) == 73 and quickstart.steps_seconds("no progress bar") is None

    def row(threads, busy, wall, steps, load):
        return {"model": "toy", "threads": threads, "busy": busy, "wall_s": wall, "steps_s": steps,
                "runnable": load, "validation_before": 0.048, "validation_after": 0.166}

    raw = {"machine": "cpu", "command": "python -m benchmarks.quickstart", "repeats": 2, "commands": {"toy": found["toy"]},
           "runs": [row(1, 0, 21.0, 8, 1.1), row(1, 0, 23.0, 9, 1.3), row(2, 0, 30.0, 12, 1.2), row(2, 0, 26.0, 10, 1.2),
                    row(1, 2, 40.0, 19, 3.0), row(1, 2, 44.0, 21, 3.4), row(2, 2, 99.0, 80, 3.2),
                    row(2, 2, 101.0, None, 3.3)]}
    assert quickstart.table(raw, "toy")[2:] == ["| idle (1.1-1.3) | 22 s (the steps: 8 s) | 28 s (the steps: 11 s) |",
                                                "| 2 busy processes (3.0-3.4) | 42 s (the steps: 20 s) | 100 s (the steps: 80 s) |"]
    assert quickstart.summary(raw, "toy") == ("validation reward 0.048 before -> 0.166 after (8 fixed-seed images); "
                                               "22 s (the steps: 8 s) on the idle machine with `OMP_NUM_THREADS=1`")
    assert quickstart.summary(raw, "toy") in quickstart.report(raw)


def test_the_readme_quotes_the_committed_quickstart_measurements():
    """The README's quickstart times and rewards are the committed benchmark's, not typed by hand."""
    from benchmarks import quickstart

    raw = json.loads((ROOT / "benchmarks" / "results" / "quickstart_cpu.json").read_text())
    readme = quickstart.documentation()
    assert raw["commands"] == quickstart.quickstart_commands(readme)  # measured on the commands printed today
    for line in quickstart.table(raw, "toy"):
        assert line in readme
    for model in raw["commands"]:
        assert quickstart.summary(raw, model) in readme
