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
    import torchvision.models._api as tv_api

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", unreachable)
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
    rows_a, per_a, _ = ev.evaluate(str(tiny_sd_path), PROMPTS, batch_size=6, **kwargs)
    rows_b, per_b, _ = ev.evaluate(str(tiny_sd_path), PROMPTS, batch_size=2, **kwargs)
    assert rows_a[0]["reward_mean"] == pytest.approx(rows_b[0]["reward_mean"], abs=1e-5)
    assert [p["diversity"] for p in per_a] == pytest.approx([p["diversity"] for p in per_b], abs=1e-5)
    assert rows_a[0]["diversity"] > 0  # different seeds give different images


def test_loras_load_change_the_reward_and_unload(tiny_sd_path, lora_dirs):
    rows, per_prompt, grids = ev.evaluate(
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
