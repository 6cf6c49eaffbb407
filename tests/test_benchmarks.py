"""benchmarks/: the speed/memory script on the toy (small settings), the trade-off helpers, the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def speed_memory(out, *extra):
    cmd = [sys.executable, "-m", "benchmarks.speed_memory", "--steps", "3", "--repeats", "1", "--batch_size", "2",
           "--memory_steps", "2", "6", "--memory_truncations", "1", "2", "--output_dir", str(out), *extra]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "speed_memory_toy_cpu.json").read_text())


def test_speed_memory_on_the_toy_memory_flat_in_t_and_profile(tmp_path):
    results = speed_memory(tmp_path)
    (timing,) = results["timing"]
    assert timing["T"] == 3 and timing["train_s"] > 0 and timing["pipeline_s"] > 0
    # The no-grad prefix keeps nothing for backward: the same bytes at T=2 and T=6.
    by_t = [r["saved_bytes"] for r in results["activation_bytes_vs_T"]]
    assert len(by_t) == 2 and by_t[0] == by_t[1] > 0
    by_k = {(r["K"], r["gradient_checkpointing"]): r["saved_bytes"] for r in results["activation_bytes_vs_K"]}
    assert by_k[(2, False)] > by_k[(1, False)] > by_k[(1, True)]  # grows with K; checkpointing saves memory
    assert by_k[(2, True)] < by_k[(2, False)]
    regions = {r["region"] for r in results["profile"]}
    assert {"draftplus/no_grad_prefix", "draftplus/graded_step", "draftplus/reference_pass",
            "draftplus/vae_decode", "draftplus/reward", "draftplus/backward"} <= regions
    report = (tmp_path / "speed_memory_toy_cpu.md").read_text()
    assert "| 3 | 1 |" in report and "## Profile of one training sample" in report

    # Re-measuring one section keeps the others and records both commands.
    again = speed_memory(tmp_path, "--sections", "profile")
    assert again["timing"] == results["timing"]
    assert [c["sections"] for c in again["commands"]] == [["timing", "peak", "memory", "profile"], ["profile"]]


def test_report_assembles_the_sections_it_finds(tmp_path, monkeypatch):
    from benchmarks import report

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "tradeoff.md").write_text("# Trade-off\n\nbody ![plot](tradeoff.png)\n")
    (tmp_path / "results" / "gpu_train_toy_metrics.jsonl").write_text(
        "\n".join(json.dumps({"step": i, "reward": 0.1 * i}) for i in range(1, 11)))
    (tmp_path / "results" / "gpu_train_toy_validation.json").write_text(json.dumps(
        {"before": 0.1, "after": 0.25, "prompts": ["a", "b"], "images_per_prompt": 4}))
    monkeypatch.setattr(report, "HERE", tmp_path)
    report.main()
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Trade-off" in text and "](results/tradeoff.png)" in text
    assert "first 5 steps 0.3000, of the last 5 0.8000" in text and "0.1000 before -> 0.2500 after" in text
    assert "Not measured yet: `speed_memory_toy_cpu.md`, `speed_memory_sd15_cuda.md`" in text


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
