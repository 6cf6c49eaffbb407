"""utils/evaluate.py: diversity metrics, the missing-LPIPS-weights error, LoRA loading and the CLI outputs."""

import csv
import json
import urllib.error

import pytest
import torch
from PIL import Image

from utils import evaluate as ev

PROMPTS = ["a red circle", "a blue square"]
FAST = {"num_inference_steps": 2, "guidance_scale": 3.0}


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
        div = ev.Diversity(metric)
        assert div(same) == pytest.approx(0.0, abs=1e-7), metric
        assert div(different) > 0.01, metric
    # pixel_l2 is the RMS difference: two constant images 0.25 apart are at distance 0.25.
    pair = torch.stack([torch.full((3, 8, 8), 0.25), torch.full((3, 8, 8), 0.5)])
    assert ev.Diversity("pixel_l2")(pair) == pytest.approx(0.25)


def test_random_backbone_lpips_is_deterministic_and_keeps_the_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = ev.Diversity("lpips_random_backbone"), ev.Diversity("lpips_random_backbone")
    assert torch.equal(torch.random.get_rng_state(), before)  # building it draws from a forked RNG
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    assert a(images) == b(images)


def test_lpips_without_alexnet_weights_offline_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ev.EvaluationError, match="alexnet-owt-7be5be79.pth.*lpips_random_backbone"):
        ev.Diversity("lpips")
    # Through the CLI: exit code 2, exactly one line on stderr, no traceback, before any model loads.
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    code = ev.main(["--pretrained_model_name_or_path", str(tmp_path / "no-model"), "--prompts", str(prompts),
                    "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: LPIPS needs torchvision's ImageNet AlexNet")


def test_lpips_download_failure_is_one_clear_line(tmp_path, monkeypatch):
    """Online but unreachable (what happens on this machine: URLError from the name lookup)."""
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(ev.EvaluationError, match=r"could not be obtained \(URLError") as info:
        ev.Diversity("lpips")
    assert "\n" not in str(info.value)


def test_bad_inputs_fail_before_loading_models(tmp_path):
    with pytest.raises(ev.EvaluationError, match="has no pytorch_lora_weights.safetensors"):
        ev.evaluate(str(tmp_path / "no-model"), PROMPTS, loras=[tmp_path], diversity_metric="pixel_l2")
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
    assert ev.main(args + [e.format(tmp=tmp_path) for e in extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0]
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
    code = ev.main([
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
    code = ev.main(cli_args(tiny_sd_path, tmp_path, out, "--lora", str(lora_dirs["random-lora"]), "--lora_scale",
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
    assert ev.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not out.exists()


def test_cli_resumes_skips_done_rows_and_overwrite_recomputes(tiny_sd_path, lora_dirs, tmp_path, monkeypatch,
                                                              capsys):
    evaluated = []
    real = ev._evaluate_model

    def counting(pipe, label, *args, **kwargs):
        evaluated.append(label)
        return real(pipe, label, *args, **kwargs)

    monkeypatch.setattr(ev, "_evaluate_model", counting)
    out = tmp_path / "eval"
    lora = str(lora_dirs["random-lora"])
    assert ev.main(cli_args(tiny_sd_path, tmp_path, out, "--lora", lora)) == 0
    first = json.loads((out / "results.json").read_text())["results"]
    assert evaluated == ["base", "checkpoint-10"]

    # extended: only the new rows are computed; the old ones (and their per-image records) are kept
    evaluated.clear()
    assert ev.main(cli_args(tiny_sd_path, tmp_path, out, "--lora", lora, "--aig", "linear")) == 0
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
    assert ev.main(cli_args(tiny_sd_path, tmp_path, out, "--lora", str(lora_dirs["zero-lora"]))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was computed from" in err[0] and "random-lora" in err[0]

    # other settings: refused, nothing rewritten
    before = (out / "results.json").read_bytes()
    assert ev.main(cli_args(tiny_sd_path, tmp_path, out, "--lora", lora, "--num_inference_steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_inference_steps=2 (now 3)" in err[0] and "--overwrite" in err[0]
    assert (out / "results.json").read_bytes() == before

    # --overwrite: starts afresh with what is asked now
    evaluated.clear()
    assert ev.main(cli_args(tiny_sd_path, tmp_path, out, "--lora", lora, "--num_inference_steps", "3",
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
    series = {s["name"]: s for s in ev.plot_series(rows)}
    assert list(series) == ["base", "LoRA", "a: LoRA scale", "a: AIG", "LoRA mix"]
    assert [r["model"] for r in series["LoRA"]["rows"]] == ["a", "b"]
    # the scale sweep runs base (0) -> 0.5 -> a (1) -> 1.5, as a line
    assert [float(r["lora_scale"]) for r in series["a: LoRA scale"]["rows"]] == [0, 0.5, 1, 1.5]
    assert series["a: LoRA scale"]["line"] and not series["a: AIG"]["line"]
    assert [r["model"] for r in series["LoRA mix"]["rows"]] == ["mix(a=0.5,b=0.5)"]
    ev.plot_reward_vs_diversity(rows, tmp_path / "plot.png")
    with Image.open(tmp_path / "plot.png") as plot:
        assert plot.format == "PNG"


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

    div = ev.Diversity("dino", model=str(tiny_dino))
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
    assert ev.main(args) == 0
    (row,) = json.loads((out / "results.json").read_text())["results"]
    assert row["diversity_metric"] == "dino" and row["diversity_model"] == str(tiny_dino) and row["diversity"] > 0
