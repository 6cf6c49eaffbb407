"""utils/evaluation/evaluate.py and its parts (utils/evaluation/diversity.py, eval_settings, eval_plan, eval_outputs): diversity metrics,
the missing-LPIPS-weights error, LoRA loading, resuming and the CLI outputs."""

import csv
import json
import urllib.error
from pathlib import Path

import pytest
import torch
from PIL import Image

from utils.evaluation import cli as evaluator_cli
from utils.evaluation import evaluate as ev
from utils.evaluation.diversity import Diversity, DiversityError
from utils.evaluation.outputs import plot_reward_vs_diversity, plot_series, standard_errors

PROMPTS = ["a red circle", "a blue square"]
FAST = {"num_inference_steps": 2, "guidance_scale": 3.0}
ERROR = "python -m utils.evaluation: error: "  # how the command line starts its one-line errors


def cli(args: list[str]) -> int:
    """The evaluator's command line, in this process: its exit code, returned or raised."""
    try:
        return evaluator_cli.main(args)
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def lora_dirs(tiny_sd_path, tmp_path_factory):
    """Two LoRAs for the tiny pipeline: a random one (changes images) and a zero one (B = 0: base exactly)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("loras")
    paths = {}
    for name, init in (("random-lora", False), ("zero-lora", "gaussian")):
        torch.manual_seed(1)
        unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
        # init_lora_weights=False draws both A and B at random, so the adapter is not the identity.
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=init,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        if init is False:
            with torch.no_grad():
                for n, p in unet.named_parameters():
                    if "lora_B" in n:
                        p.mul_(20)  # strong enough to visibly change the tiny model's images
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        paths[name] = root / name / "checkpoint-10"
        StableDiffusionPipeline.save_lora_weights(paths[name], unet_lora_layers=state)
    return paths


def test_diversity_zero_for_identical_and_positive_for_different_images():
    torch.manual_seed(0)
    different = torch.rand(3, 3, 32, 32)
    same = different[:1].repeat(3, 1, 1, 1)
    for metric in ("pixel_l2", "lpips_random_backbone"):
        div = Diversity(metric)
        assert div(same) == pytest.approx(0.0, abs=1e-7), metric
        assert div(different) > 0.01, metric
    # pixel_l2 is the RMS difference: two constant images 0.25 apart are at distance 0.25.
    pair = torch.stack([torch.full((3, 8, 8), 0.25), torch.full((3, 8, 8), 0.5)])
    assert Diversity("pixel_l2")(pair) == pytest.approx(0.25)


def test_random_backbone_lpips_is_deterministic_and_keeps_the_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = Diversity("lpips_random_backbone"), Diversity("lpips_random_backbone")
    assert torch.equal(torch.random.get_rng_state(), before)  # building it draws from a forked RNG
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    assert a(images) == b(images)


def test_lpips_without_alexnet_weights_offline_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DiversityError, match="alexnet-owt-7be5be79.pth.*lpips_random_backbone"):
        Diversity("lpips")
    # Through the CLI: exit code 2, exactly one line on stderr, no traceback, before any model loads.
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    code = cli(["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--prompts", str(prompts),
                "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{ERROR}LPIPS needs torchvision's ImageNet AlexNet")


def test_lpips_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    """Online but unreachable (what happens on this machine: URLError from the name lookup)."""
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(DiversityError, match=r"could not be obtained \(URLError") as info:
        Diversity("lpips")
    assert "\n" not in str(info.value)


def test_bad_inputs_fail_before_loading_models(tmp_path):
    with pytest.raises(ev.EvaluationError, match="has no pytorch_lora_weights.safetensors"):
        ev.evaluate(str(tmp_path / "no-model"), PROMPTS, loras=[tmp_path], diversity_metric="pixel_l2")
    missing = tmp_path / "no-such-run"
    with pytest.raises(ev.EvaluationError, match=f"^LoRA '{missing}' does not exist$"):
        ev.evaluate(str(tmp_path / "no-model"), PROMPTS, loras=[missing], diversity_metric="pixel_l2")
    with pytest.raises(ev.EvaluationError, match="seeds_per_prompt"):
        ev.evaluate(str(tmp_path / "no-model"), PROMPTS, seeds_per_prompt=1)
    with pytest.raises(ev.EvaluationError, match="unknown diversity metric"):
        ev.evaluate(str(tmp_path / "no-model"), PROMPTS, diversity_metric="fid")


@pytest.mark.parametrize("extra, expected", [
    (["--reward_options", "novalue"], "key=value"),
    (["--prompts", "{tmp}/missing.txt"], "does not exist"),
    (["--reward", "nosuchreward"], "nosuchreward"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, expected):
    args = ["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--prompts", "animals",
            "--diversity_metric", "pixel_l2", "--output_dir", str(tmp_path / "out")]
    assert cli(args + [e.format(tmp=tmp_path) for e in extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(ERROR) and expected in err[0]
    assert not (tmp_path / "out").exists()


def test_same_seeds_whatever_the_batching(tiny_sd_path):
    kwargs = {"reward": "redness", "seeds_per_prompt": 3, "diversity_metric": "pixel_l2", "device": "cpu", **FAST}
    rows_a, per_a, _, images_a = ev.evaluate(str(tiny_sd_path), PROMPTS, batch_size=6, **kwargs)
    rows_b, per_b, _, images_b = ev.evaluate(str(tiny_sd_path), PROMPTS, batch_size=2, **kwargs)
    assert rows_a[0]["reward_mean"] == pytest.approx(rows_b[0]["reward_mean"], abs=1e-5)
    assert [p["diversity"] for p in per_a] == pytest.approx([p["diversity"] for p in per_b], abs=1e-5)
    assert rows_a[0]["diversity"] > 0  # different seeds give different images
    assert [(r["prompt_index"], r["seed_index"]) for r in images_a] == [(i, j) for i in range(2) for j in range(3)]
    assert [r["reward"] for r in images_a] == pytest.approx([r["reward"] for r in images_b], abs=1e-5)


def test_loras_load_change_the_reward_and_unload(tiny_sd_path, lora_dirs):
    rows, per_prompt, grids, _ = ev.evaluate(
        str(tiny_sd_path), PROMPTS, reward="redness", loras=[lora_dirs["random-lora"], lora_dirs["zero-lora"]],
        seeds_per_prompt=2, diversity_metric="pixel_l2", device="cpu", grid_prompts=1, **FAST)
    by_label = {r["model"]: r for r in rows}
    # Both LoRAs are checkpoint-10 dirs: the labels are disambiguated by their parent dirs.
    assert list(by_label) == ["base", "random-lora/checkpoint-10", "zero-lora/checkpoint-10"]
    base, random_lora, zero_lora = rows
    # Same seeds, so any difference is the LoRA's: 100x above the zero LoRA's agreement (1e-6) below.
    assert abs(random_lora["reward_mean"] - base["reward_mean"]) > 1e-4
    assert (grids["random-lora/checkpoint-10"] - grids["base"]).abs().max() > 0.01
    # The zero LoRA is evaluated after the random one: equal to base only if unload restored the base UNet.
    assert zero_lora["reward_mean"] == pytest.approx(base["reward_mean"], abs=1e-6)
    assert zero_lora["diversity"] == pytest.approx(base["diversity"], abs=1e-6)
    assert len(per_prompt) == 3 * len(PROMPTS)
    assert grids["base"].shape == (2, 3, 32, 32)


def test_cli_writes_tables_and_plot(tiny_sd_path, lora_dirs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "eval"
    code = evaluator_cli.main([
        "--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts", str(prompts),
        "--lora", str(lora_dirs["random-lora"]), "--seeds_per_prompt", "2",
        "--num_inference_steps", "2", "--guidance_scale", "3", "--reward", "redness",
        "--diversity_metric", "lpips_random_backbone", "--device", "cpu", "--output_dir", str(out)])
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["results"]
    assert [r["model"] for r in rows] == ["base", "checkpoint-10"]
    assert {r["diversity_metric"] for r in rows} == {"lpips_random_backbone"}
    assert all(r["num_images"] == 4 and r["resolution"] == 32 and r["reward"] == "redness" for r in rows)
    assert result["settings"]["diversity_metric"] == "lpips_random_backbone"
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == ["base", "checkpoint-10"]
    assert float(table[1]["reward_mean"]) == pytest.approx(rows[1]["reward_mean"])
    assert table[0]["diversity_metric"] == "lpips_random_backbone"
    with open(out / "per_prompt.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(PROMPTS)
    with Image.open(out / "reward_vs_diversity.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
    assert (out / "samples_base.png").is_file() and (out / "samples_checkpoint-10.png").is_file()
    assert rows[1]["path"] == str(lora_dirs["random-lora"])


def test_lora_for_another_model_is_a_clear_error(tiny_sd_path, tmp_path):
    from safetensors.torch import save_file

    save_file({"unet.foo.bar.lora.down.weight": torch.zeros(4, 8), "unet.foo.bar.lora.up.weight": torch.zeros(8, 4)},
              tmp_path / "pytorch_lora_weights.safetensors")
    with pytest.raises(ev.EvaluationError, match="does not load into this base model"):
        ev.evaluate(str(tiny_sd_path), PROMPTS, loras=[tmp_path], diversity_metric="pixel_l2", device="cpu", **FAST)


# ----------------------------------------------------------------------------- controls: scale, AIG, mix


def cli_args(tiny_sd_path, tmp_path, out, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return ["--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts", str(prompts), "--seeds_per_prompt",
            "2", "--num_inference_steps", "2", "--guidance_scale", "3", "--reward", "redness",
            "--diversity_metric", "pixel_l2", "--device", "cpu", "--grid_prompts", "1", "--output_dir", str(out),
            *extra]


def test_cli_controls_rows_tables_and_plot(tiny_sd_path, lora_dirs, tmp_path):
    out = tmp_path / "eval"
    code = evaluator_cli.main(cli_args(tiny_sd_path, tmp_path, out, "--lora", str(lora_dirs["random-lora"]), "--lora_scale",
                            "0.5", "--aig", "power_2", "--mix", "checkpoint-10=0.5"))
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    labels = ["base", "checkpoint-10", "checkpoint-10@scale=0.5", "checkpoint-10@aig=power_2",
              "mix(checkpoint-10=0.5)"]
    assert [r["model"] for r in result["results"]] == labels
    assert [r["control"] for r in result["results"]] == ["base", "lora", "scale", "aig", "mix"]
    assert result["results"][2]["lora_scale"] == 0.5 and result["results"][3]["aig_schedule"] == "power_2"
    assert result["settings"]["aig"] == ["power_2"] and result["fingerprint"]["num_inference_steps"] == 2
    with open(out / "per_image.csv", newline="") as f:
        per_image = list(csv.DictReader(f))
    assert len(per_image) == len(labels) * len(PROMPTS) * 2
    assert {(r["prompt_index"], r["seed_index"]) for r in per_image} == {("0", "0"), ("0", "1"), ("1", "0"),
                                                                         ("1", "1")}
    with Image.open(out / "reward_vs_diversity.png") as plot:
        assert plot.format == "PNG"
    assert (out / "samples_mix_checkpoint-10_0.5_.png").is_file()


def test_control_values_agree_with_what_they_mean(tiny_sd_path, lora_dirs, tmp_path):
    random_lora, zero_lora = lora_dirs["random-lora"], lora_dirs["zero-lora"]
    result = ev.evaluate(str(tiny_sd_path), PROMPTS, reward="redness", loras=[random_lora, zero_lora],
                         seeds_per_prompt=2, diversity_metric="pixel_l2", device="cpu",
                         lora_scales=[0, 0.5], aig=["base", "lora", "linear"],
                         mixes=[["random-lora/checkpoint-10=0.5"],
                                {"random-lora/checkpoint-10": 1.0, "zero-lora/checkpoint-10": 1.0}], **FAST)
    by_label = {r["model"]: r for r in result.rows}
    name = "random-lora/checkpoint-10"
    assert [r["model"] for r in result.rows][:7] == [
        "base", name, f"{name}@scale=0", f"{name}@scale=0.5", f"{name}@aig=base", f"{name}@aig=lora",
        f"{name}@aig=linear"]
    assert list(by_label)[-2:] == [f"mix({name}=0.5)", f"mix({name}=1,zero-lora/checkpoint-10=1)"]
    assert {r["control"] for r in result.rows} == {"base", "lora", "scale", "aig", "mix"}

    def same(a, b):
        return by_label[a]["reward_mean"] == pytest.approx(by_label[b]["reward_mean"], abs=1e-6) and \
            by_label[a]["diversity"] == pytest.approx(by_label[b]["diversity"], abs=1e-6)

    assert abs(by_label[name]["reward_mean"] - by_label["base"]["reward_mean"]) > 1e-4  # the LoRA matters
    assert same(f"{name}@scale=0", "base") and same(f"{name}@aig=base", "base") and same(f"{name}@aig=lora", name)
    assert same(f"mix({name}=0.5)", f"{name}@scale=0.5")  # a one-LoRA mix is that LoRA at that scale
    assert same(f"mix({name}=1,zero-lora/checkpoint-10=1)", name)  # adding a zero LoRA changes nothing
    for middle in (f"{name}@scale=0.5", f"{name}@aig=linear"):
        assert not same(middle, "base") and not same(middle, name)
    # per-image rewards: one per (row, prompt, seed), averaging to the row's mean
    assert len(result.per_image) == len(result.rows) * len(PROMPTS) * 2
    for row in result.rows:
        mine = [r["reward"] for r in result.per_image if r["model"] == row["model"]]
        assert sum(mine) / len(mine) == pytest.approx(row["reward_mean"], abs=1e-6)


def test_a_loras_rows_share_one_load_and_each_sets_its_own_weight(tiny_sd_path, lora_dirs, monkeypatch):
    """Its plain, scaled and AIG rows (and a mix of it alone) load the LoRA file once: reading it per row is
    repeated I/O. Every row still gets its own adapter weight, also after an AIG row."""
    from diffusers import StableDiffusionPipeline

    loads = []
    real = StableDiffusionPipeline.load_lora_weights

    def counting(self, path, *args, **kwargs):
        loads.append(Path(path).parent.name)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "load_lora_weights", counting)
    result = ev.evaluate(str(tiny_sd_path), PROMPTS, reward="redness", loras=[lora_dirs["random-lora"]],
                         seeds_per_prompt=2, diversity_metric="pixel_l2", device="cpu", lora_scales=[0.5],
                         aig=["linear"], mixes=[["checkpoint-10=0.5"]], **FAST)
    rewards = {r["model"]: r["reward_mean"] for r in result.rows}
    assert list(rewards) == ["base", "checkpoint-10", "checkpoint-10@scale=0.5", "checkpoint-10@aig=linear",
                             "mix(checkpoint-10=0.5)"]
    assert loads == ["random-lora"]
    # the mix row comes after the AIG row, on the same loaded adapter: it must run at weight 0.5, not 1
    assert rewards["mix(checkpoint-10=0.5)"] == pytest.approx(rewards["checkpoint-10@scale=0.5"], abs=1e-6)
    assert abs(rewards["checkpoint-10@scale=0.5"] - rewards["checkpoint-10"]) > 1e-4


@pytest.mark.parametrize("extra, expected", [
    (["--aig", "cosine"], "--lora"),  # no LoRA to steer
    (["--lora", "{lora}", "--aig", "cosine"], "unknown AIG schedule 'cosine'"),
    (["--lora_scale", "0.5"], "--lora_scale and --aig apply to the LoRAs"),
    (["--lora", "{lora}", "--mix", "nosuch=0.5"], "--mix nosuch: neither the label"),
    (["--lora", "{lora}", "--mix", "checkpoint-10=half"], "not a number"),
    (["--lora", "{lora}", "--mix", "checkpoint-10=0.5", "{lora}=0.5"], "two components have the same label"),
    (["--lora", "{lora}", "--aig", "linear", "linear"], "rows requested twice"),
    (["--diversity_metric", "dino", "--diversity_model", "{tmp}/no-dino"], "cannot load the DINOv2 model"),
])
def test_control_bad_input_is_one_line_and_exit_2(tiny_sd_path, lora_dirs, tmp_path, capsys, extra, expected):
    out = tmp_path / "out"
    args = cli_args(tiny_sd_path, tmp_path, out) + [e.format(lora=lora_dirs["random-lora"], tmp=tmp_path)
                                                    for e in extra]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(ERROR) and expected in err[0], err
    assert not out.exists()


def record_evaluated_rows(monkeypatch) -> list[str]:
    """The labels of the rows the evaluator computes from now on, in order (the list fills as it runs)."""
    evaluated = []
    real = ev._evaluate_model

    def counting(pipe, label, *args, **kwargs):
        evaluated.append(label)
        return real(pipe, label, *args, **kwargs)

    monkeypatch.setattr(ev, "_evaluate_model", counting)
    return evaluated


def test_cli_resumes_skips_done_rows_and_overwrite_recomputes(tiny_sd_path, lora_dirs, tmp_path, monkeypatch,
                                                              capsys):
    evaluated = record_evaluated_rows(monkeypatch)
    out = tmp_path / "eval"
    lora = str(lora_dirs["random-lora"])
    assert evaluator_cli.main(cli_args(tiny_sd_path, tmp_path, out, "--lora", lora)) == 0
    first = json.loads((out / "results.json").read_text())["results"]
    assert evaluated == ["base", "checkpoint-10"]

    # extended: only the new rows are computed; the old ones (and their per-image records) are kept
    evaluated.clear()
    assert evaluator_cli.main(cli_args(tiny_sd_path, tmp_path, out, "--lora", lora, "--aig", "linear")) == 0
    assert evaluated == ["checkpoint-10@aig=linear"]
    assert "skipped" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["results"]
    assert rows[:2] == first and [r["model"] for r in rows] == ["base", "checkpoint-10", "checkpoint-10@aig=linear"]
    with open(out / "per_image.csv", newline="") as f:
        per_image = list(csv.DictReader(f))
    assert [r["model"] for r in per_image].count("base") == 2 * len(PROMPTS) and len(per_image) == 3 * 2 * len(PROMPTS)
    with open(out / "results.csv", newline="") as f:
        assert [r["model"] for r in csv.DictReader(f)] == [r["model"] for r in rows]
    assert (out / "samples_checkpoint-10_aig_linear.png").is_file() and (out / "samples_base.png").is_file()

    # the same label for another LoRA (zero-lora/checkpoint-10 is also "checkpoint-10"): refused
    assert cli(cli_args(tiny_sd_path, tmp_path, out, "--lora", str(lora_dirs["zero-lora"]))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was computed from" in err[0] and "random-lora" in err[0]

    # other settings: refused, nothing rewritten
    before = (out / "results.json").read_bytes()
    assert cli(cli_args(tiny_sd_path, tmp_path, out, "--lora", lora, "--num_inference_steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_inference_steps=2 (now 3)" in err[0] and "--overwrite" in err[0]
    assert (out / "results.json").read_bytes() == before

    # --overwrite: starts afresh with what is asked now
    evaluated.clear()
    assert evaluator_cli.main(cli_args(tiny_sd_path, tmp_path, out, "--lora", lora, "--num_inference_steps", "3",
                            "--overwrite")) == 0
    assert evaluated == ["base", "checkpoint-10"]
    assert [r["model"] for r in json.loads((out / "results.json").read_text())["results"]] == ["base", "checkpoint-10"]


def test_plot_puts_each_kind_of_control_in_its_own_series(tmp_path):
    def row(model, control, reward, diversity, **extra):
        return {"model": model, "control": control, "reward_mean": reward, "diversity": diversity,
                "reward": "redness", "diversity_metric": "pixel_l2", "num_prompts": 2, "seeds_per_prompt": 2,
                "lora": extra.pop("lora", "" if control == "base" else "a"), "lora_scale": "", "aig_schedule": "",
                **extra}

    rows = [row("base", "base", 0.1, 0.5), row("a", "lora", 0.5, 0.2), row("b", "lora", 0.4, 0.3, lora="b"),
            row("a@scale=1.5", "scale", 0.6, 0.1, lora_scale=1.5), row("a@scale=0.5", "scale", 0.3, 0.4, lora_scale=0.5),
            row("a@aig=linear", "aig", 0.35, 0.45, aig_schedule="linear"),
            row("mix(a=0.5,b=0.5)", "mix", 0.45, 0.25, lora="a+b")]
    series = {s["name"]: s for s in plot_series(rows)}
    assert list(series) == ["base", "LoRA", "a: LoRA scale", "a: AIG", "LoRA mix"]
    assert [r["model"] for r in series["LoRA"]["rows"]] == ["b"]  # a: the sweep's scale-1 point, not a hidden circle
    # the scale sweep runs base (0) -> 0.5 -> a (1) -> 1.5, as a line
    assert [float(r["lora_scale"]) for r in series["a: LoRA scale"]["rows"]] == [0, 0.5, 1, 1.5]
    assert series["a: LoRA scale"]["line"] and not series["a: AIG"]["line"]
    assert [r["model"] for r in series["LoRA mix"]["rows"]] == ["mix(a=0.5,b=0.5)"]
    assert plot_reward_vs_diversity(rows, tmp_path / "plot.png") == list(series)  # the legend: the series drawn
    with Image.open(tmp_path / "plot.png") as plot:
        assert plot.format == "PNG"


def test_the_plots_error_bars_are_the_standard_errors_of_each_rows_means():
    row = {"reward_std": 0.2, "num_images": 16, "diversity_std": 0.06, "num_prompts": 4}
    assert standard_errors(row) == pytest.approx((0.06 / 2, 0.2 / 4))
    assert standard_errors({"reward_std": "0.2", "num_images": "4"}) == pytest.approx((0.0, 0.1))  # csv; no diversity


# ----------------------------------------------------------------------------- dino diversity


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    """A tiny random DINOv2 with a DINOv2-style processor, saved like a hub checkpoint."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("tiny-dino")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


def test_dino_diversity_is_one_minus_mean_pairwise_cosine_of_cls_embeddings(tiny_dino):
    from transformers import AutoImageProcessor, Dinov2Model

    div = Diversity("dino", model=str(tiny_dino))
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    assert div(images[:1].repeat(3, 1, 1, 1)) == pytest.approx(0.0, abs=1e-6)
    # by hand, from the transformers classes
    processor, model = AutoImageProcessor.from_pretrained(tiny_dino), Dinov2Model.from_pretrained(tiny_dino)
    with torch.no_grad():
        cls = model(**processor(images=[(im * 255).round().byte().numpy().transpose(1, 2, 0) for im in images],
                                return_tensors="pt")).last_hidden_state[:, 0]
    cos = torch.nn.functional.cosine_similarity(cls[:, None], cls[None], dim=-1)
    expected = 1 - (cos[0, 1] + cos[0, 2] + cos[1, 2]) / 3
    assert div(images) == pytest.approx(float(expected), abs=2e-3)  # byte rounding of the by-hand input
    assert div(images) > 1e-3


def test_cli_with_dino_records_the_metric_and_model(tiny_sd_path, tiny_dino, tmp_path):
    out = tmp_path / "eval"
    args = cli_args(tiny_sd_path, tmp_path, out, "--diversity_model", str(tiny_dino))
    args[args.index("pixel_l2")] = "dino"
    assert evaluator_cli.main(args) == 0
    (row,) = json.loads((out / "results.json").read_text())["results"]
    assert row["diversity_metric"] == "dino" and row["diversity_model"] == str(tiny_dino) and row["diversity"] > 0


# ----------------------------------------------------------------------------- resume integrity, errors, grids


def test_a_lora_changed_in_place_is_evaluated_again(tiny_sd_path, lora_dirs, tmp_path, monkeypatch, capsys):
    """Retraining into the same directory (--overwrite_output_dir) must not leave the old reward "skipped"."""
    import hashlib
    import shutil

    evaluated = record_evaluated_rows(monkeypatch)
    lora = tmp_path / "run" / "checkpoint-10"
    shutil.copytree(lora_dirs["random-lora"], lora)
    out = tmp_path / "eval"
    assert cli(cli_args(tiny_sd_path, tmp_path, out, "--lora", str(lora))) == 0
    first = {r["model"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert evaluated == ["base", "checkpoint-10"]

    weights = lora / "pytorch_lora_weights.safetensors"
    shutil.copyfile(lora_dirs["zero-lora"] / "pytorch_lora_weights.safetensors", weights)  # "retrained"
    evaluated.clear()
    capsys.readouterr()
    assert cli(cli_args(tiny_sd_path, tmp_path, out, "--lora", str(lora))) == 0
    assert evaluated == ["checkpoint-10"]  # the base row is still valid; the LoRA row is not
    assert "changed" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["model"] for r in rows] == ["base", "checkpoint-10"]
    again = {r["model"]: r for r in rows}
    assert again["base"] == first["base"]
    assert abs(again["checkpoint-10"]["reward_mean"] - first["checkpoint-10"]["reward_mean"]) > 1e-4
    # the zero LoRA is the base model: the recomputed row says so
    assert again["checkpoint-10"]["reward_mean"] == pytest.approx(first["base"]["reward_mean"], abs=1e-6)
    assert again["checkpoint-10"]["lora_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    with open(out / "per_image.csv", newline="") as f:
        per_image = [r for r in csv.DictReader(f) if r["model"] == "checkpoint-10"]
    assert len(per_image) == 2 * len(PROMPTS)  # the old row's records replaced, not kept beside the new ones
    assert sum(float(r["reward"]) for r in per_image) / len(per_image) == pytest.approx(
        again["checkpoint-10"]["reward_mean"], abs=1e-6)

    evaluated.clear()  # unchanged now: skipped
    assert cli(cli_args(tiny_sd_path, tmp_path, out, "--lora", str(lora))) == 0
    assert evaluated == []


def test_output_dir_naming_a_file_is_one_line_before_any_model_loads(tiny_sd_path, tmp_path, capsys):
    """In this process (the command's entry point and its exit codes run as a subprocess in tests/test_readme.py)."""
    for output_dir in (tmp_path / "results.txt", tmp_path / "results.txt" / "eval"):
        (tmp_path / "results.txt").write_text("not a directory\n")
        assert cli(cli_args(tiny_sd_path, tmp_path, output_dir)) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(ERROR) and "not a directory" in lines[0], lines
        assert "--output_dir" in lines[0] and (tmp_path / "results.txt").read_text() == "not a directory\n"


def test_errors_name_the_option_as_the_caller_wrote_it(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "eval"
    kwargs = {"seeds_per_prompt": 2, "diversity_metric": "pixel_l2", "device": "cpu", "output_dir": out, **FAST}
    ev.evaluate(str(tiny_sd_path), PROMPTS, **kwargs)
    with pytest.raises(ev.EvaluationError, match="num_inference_steps=2 \\(now 3\\)") as info:
        ev.evaluate(str(tiny_sd_path), PROMPTS, **{**kwargs, "num_inference_steps": 3})
    assert "overwrite=True" in str(info.value) and "--overwrite" not in str(info.value)
    with pytest.raises(ev.EvaluationError, match="lora_scales and aig apply to the LoRAs given with loras"):
        ev.evaluate(str(tiny_sd_path), PROMPTS, lora_scales=[0.5], **kwargs)
    # the command line names its flags
    assert cli(cli_args(tiny_sd_path, tmp_path, out, "--num_inference_steps", "3")) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err


def test_sample_grids_are_labelled_with_their_row_and_prompts_in_row_order(tiny_sd_path, lora_dirs, tmp_path):
    out = tmp_path / "eval"
    assert cli(cli_args(tiny_sd_path, tmp_path, out, "--lora", str(lora_dirs["random-lora"]), "--lora_scale", "0.5",
                        "--grid_prompts", "2")) == 0
    labels = ["base", "checkpoint-10", "checkpoint-10@scale=0.5"]
    files = [out / f"samples_{name}.png" for name in ("base", "checkpoint-10", "checkpoint-10_scale_0.5")]
    seeds, side = 2, 32
    grids = []
    for file in files:
        with Image.open(file) as image:
            grids.append(image.convert("RGB"))
    # more than the bare tiles (2 prompts x 2 seeds of 32 px, at most 4x enlarged): room for the labels
    bare = (seeds * side * 4 + 2 * seeds, len(PROMPTS) * side * 4 + 2 * len(PROMPTS))
    assert all(g.width > bare[0] and g.height > bare[1] for g in grids)

    from utils.evaluation.image_grid import GridLayout, to_pil
    from utils.evaluation.outputs import prompt_label

    result = ev.evaluate(str(tiny_sd_path), PROMPTS, loras=[lora_dirs["random-lora"]], lora_scales=[0.5],
                         seeds_per_prompt=2, diversity_metric="pixel_l2", device="cpu", grid_prompts=2, **FAST)
    for label, grid in zip(labels, grids, strict=True):
        layout = GridLayout([prompt_label(i, p) for i, p in enumerate(PROMPTS)], seeds, (128, 128), label)
        assert grid.size == layout.size
        # the title strip (the row label) and each prompt's label cell hold text: dark pixels on white
        title = grid.crop((0, 0, grid.width, layout.title_height))
        assert min(title.convert("L").getdata()) < 100, label
        for k in range(len(PROMPTS)):
            assert min(grid.crop(layout.label_box(k)).convert("L").getdata()) < 100, (label, k)
            for j in range(seeds):  # image (k, j) where the layout says, as rendered
                left, top = layout.tile_origin(k, j)
                expected = to_pil(result.grids[label][k * seeds + j]).resize((128, 128), resample=Image.NEAREST)
                tile = grid.crop((left, top, left + 128, top + 128))
                assert list(tile.getdata()) == list(expected.getdata()), (label, k, j)
    # samples.png: every row's grid, one under another, in the order of the rows
    with Image.open(out / "samples.png") as combined:
        combined = combined.convert("RGB")
    top = 0
    for grid in grids:
        part = combined.crop((0, top, grid.width, top + grid.height))
        assert list(part.getdata()) == list(grid.getdata())
        top += grid.height
    assert combined.height == top


def test_every_setting_that_defines_the_numbers_is_in_the_fingerprint():
    """The fingerprint is the settings minus a named few: a new setting is in it unless excluded on purpose."""
    import dataclasses

    from utils.evaluation.settings import EvalSettings

    base = EvalSettings("toy", ("a", "b"))
    other_values = {"model": "other", "prompts": ("a", "c"), "reward": "brightness", "reward_options": {"k": 1},
                    "seeds_per_prompt": 3, "seed": 1, "num_inference_steps": 3, "guidance_scale": 1.0,
                    "resolution": 64, "height": 64, "width": 64, "scheduler": "euler", "eta": 0.5,
                    "negative_prompt": "blur", "family_options": {"max_sequence_length": 128}, "dtype": "bf16",
                    "diversity_metric": "dino",
                    "diversity_model": None, "batch_size": 3, "device": "cuda", "grid_prompts": 2}
    names = [f.name for f in dataclasses.fields(EvalSettings)]
    assert sorted(other_values) == sorted(names)  # a new field needs a value here, and a decision
    assert EvalSettings.NOT_IN_FINGERPRINT == {"batch_size", "device", "grid_prompts"}
    for name in names:
        changed = dataclasses.replace(base, **{name: other_values[name]})
        if name in EvalSettings.NOT_IN_FINGERPRINT:
            assert changed.fingerprint() == base.fingerprint(), name
        elif name == "diversity_model":  # only dino has a model: with lpips it is nothing, whatever is passed
            assert changed.diversity_model is None
            dino = dataclasses.replace(base, diversity_metric="dino")
            assert dataclasses.replace(dino, diversity_model="x").fingerprint() != dino.fingerprint()
        else:
            assert changed.fingerprint() != base.fingerprint(), name
    # the keys of results.json written before the settings were one object: such directories still resume
    assert set(base.fingerprint()) == {
        "model", "prompts_sha256", "num_prompts", "reward", "reward_options", "seeds_per_prompt", "seed",
        "num_inference_steps", "guidance_scale", "resolution", "height", "width", "diversity_metric",
        "diversity_model", "scheduler", "negative_prompt", "eta", "dtype"}
    assert base.fingerprint()["dtype"] == "float32" and EvalSettings("toy", ("a",), dtype=torch.float32).dtype == "float32"
    with pytest.raises(ev.EvaluationError, match="unknown dtype"):
        EvalSettings("toy", ("a",), dtype="fp8")


@pytest.mark.parametrize("extra, expected", [
    (["--max_sequence_length", "64"], "--max_sequence_length is for "),
    (["--true_cfg_scale", "2"], "--true_cfg_scale is for "),
])
def test_another_familys_option_is_one_line_before_any_model_loads(extra, expected, tmp_path, capsys):
    """The evaluator takes every family's options, and refuses them for a model whose family does not (the
    trainer's check, `ModelFamily.option_problem`)."""
    args = ["--pretrained_model_name_or_path", "toy", "--prompts", "animals", "--diversity_metric", "pixel_l2",
            "--output_dir", str(tmp_path / "out"), *extra]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(ERROR) and expected in err[0], err
    assert err[0].endswith("models; StableDiffusionPipeline models do not take it") and "FluxPipeline" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_runs_recorded_settings_fill_in_what_is_not_given(tmp_path):
    """A final LoRA's draftplus_settings.json, a checkpoint's draftplus_run.json `sampling`; a setting given wins,
    a size given in any form keeps the runs' sizes out, and runs that disagree on a setting left out are refused."""
    from utils.evaluation.run_settings import RUN_CONFIG_NAME, SETTINGS_NAME, settings_of_runs

    recorded = {"scheduler": "ddim", "num_inference_steps": 10, "guidance_scale": 5.0, "eta": 0.0, "height": 32,
                "width": 48}
    final, checkpoint, other = tmp_path / "run", tmp_path / "run" / "checkpoint-20", tmp_path / "other"
    for directory in (checkpoint, other):
        directory.mkdir(parents=True)
    (final / SETTINGS_NAME).write_text(json.dumps(recorded))
    (checkpoint / RUN_CONFIG_NAME).write_text(json.dumps({"rank": 4, "sampling": recorded}))
    (other / SETTINGS_NAME).write_text(json.dumps({**recorded, "num_inference_steps": 50}))

    settings, sources = settings_of_runs([final, checkpoint / "pytorch_lora_weights.safetensors"], {})
    assert settings == recorded and sources == [final / SETTINGS_NAME, checkpoint / RUN_CONFIG_NAME]
    settings, _ = settings_of_runs([final], {"guidance_scale": 2.0, "resolution": 64, "eta": None})
    assert settings == {"scheduler": "ddim", "num_inference_steps": 10, "eta": 0.0}
    assert settings_of_runs([tmp_path], {}) == ({}, [])  # no recorded settings: nothing taken
    with pytest.raises(ev.EvaluationError, match="different num_inference_steps: 10 .*, 50 .*; give --num_inf"):
        settings_of_runs([final, other], {}, spell=lambda name: f"--{name}")
    assert settings_of_runs([final, other], {"num_inference_steps": 3})[0]["scheduler"] == "ddim"
    older = tmp_path / "older" / "checkpoint-5"  # a run config from before it recorded `sampling`: its arguments
    older.mkdir(parents=True)
    (older / RUN_CONFIG_NAME).write_text(json.dumps({"args": {**recorded, "negative_prompt": "", "rank": 4,
                                                              "true_cfg_scale": None, "max_sequence_length": 256}}))
    assert settings_of_runs([older], {})[0] == {**recorded, "max_sequence_length": 256}
