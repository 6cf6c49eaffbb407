"""Model-free rewards and the spec/catalogue/options machinery (no model weights anywhere)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from rewards import (
    Reward,
    RewardSpecError,
    WeightedSumReward,
    build_reward,
    list_rewards,
    parse_reward_options,
    parse_reward_spec,
    validate_reward_spec,
)

PROMPTS2 = ["a red circle", "a blue square"]


def solid(rgb, size=8, batch=1) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(batch, 3, size, size).clone()


# ---------------------------------------------------------------- values on known tensors


@pytest.mark.parametrize(
    ("rgb", "expected"),
    [((1, 0, 0), 1.0), ((0, 1, 1), -1.0), ((0.5, 0.5, 0.5), 0.0), ((0.8, 0.2, 0.4), 0.8 - 0.3)],
)
def test_redness_is_r_minus_mean_gb(rgb, expected):
    r = build_reward("redness")
    assert r(solid(rgb), ["x"]).item() == pytest.approx(expected, abs=1e-6)


def test_redness_on_random_image_matches_formula():
    x = torch.rand(3, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    expected = (x[:, 0] - (x[:, 1] + x[:, 2]) / 2).mean(dim=(1, 2))
    torch.testing.assert_close(build_reward("redness")(x, ["a"] * 3), expected)
    # `color` with target=red is the same reward; hex and r;g;b spellings too.
    for target in ("red", "#ff0000", "1;0;0", (1.0, 0.0, 0.0)):
        torch.testing.assert_close(build_reward("color", target=target)(x, ["a"] * 3), expected)


@pytest.mark.parametrize("target", ["green", "blue", "yellow", "cyan", "magenta", "orange", "#3366cc"])
def test_color_is_one_at_target_and_zero_on_grey(target):
    from rewards.simple import parse_color

    r = build_reward("color", target=target)
    assert r(solid(parse_color(target)), ["x"]).item() == pytest.approx(1.0, abs=1e-5)
    assert r(solid((0.3, 0.3, 0.3)), ["x"]).item() == pytest.approx(0.0, abs=1e-6)


def test_color_rejects_grey_and_unknown_targets():
    with pytest.raises(RewardSpecError, match="grey"):
        build_reward("color", target="0.5;0.5;0.5")
    with pytest.raises(RewardSpecError, match="unknown colour"):
        build_reward("color", target="chartreuse-ish")


def test_brightness_values():
    r = build_reward("brightness")
    assert r(solid((1, 1, 1)), ["x"]).item() == pytest.approx(1.0, abs=1e-6)
    assert r(solid((0, 0, 0)), ["x"]).item() == pytest.approx(0.0, abs=1e-7)
    assert r(solid((0, 1, 0)), ["x"]).item() == pytest.approx(0.7152, abs=1e-6)
    half = torch.zeros(1, 3, 4, 4)
    half[..., :2, :] = 1.0  # top half white
    assert r(half, ["x"]).item() == pytest.approx(0.5, abs=1e-6)


def test_saturation_values():
    r = build_reward("saturation")
    assert r(solid((1, 0, 0)), ["x"]).item() == pytest.approx(1 / 1.001, abs=1e-6)
    assert r(solid((0.5, 0.5, 0.5)), ["x"]).item() == pytest.approx(0.0, abs=1e-7)
    assert r(solid((0.8, 0.4, 0.4)), ["x"]).item() == pytest.approx(0.4 / 0.801, abs=1e-6)


def test_colorfulness_matches_hasler_susstrunk_reference():
    # Reference: the paper's formula in numpy on a 0-255 image, divided by 255.
    import numpy as np

    x = torch.rand(2, 3, 6, 9, generator=torch.Generator().manual_seed(1))
    got = build_reward("colorfulness")(x, ["a", "b"])
    for i in range(2):
        img = x[i].double().numpy() * 255
        rg = img[0] - img[1]
        yb = 0.5 * (img[0] + img[1]) - img[2]
        m = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
        assert got[i].item() == pytest.approx(m / 255, abs=1e-4)
    grey = build_reward("colorfulness")(solid((0.5, 0.5, 0.5)), ["x"]).item()
    assert grey == pytest.approx(0.0, abs=1e-3)


def test_compressibility_values():
    r = build_reward("compressibility")
    assert r(solid((0.2, 0.7, 0.1)), ["x"]).item() == pytest.approx(0.0, abs=1e-7)
    stripes = torch.zeros(1, 3, 4, 4)
    stripes[..., :, 1::2] = 1.0  # vertical stripes: every horizontal step is 1, vertical 0
    assert r(stripes, ["x"]).item() == pytest.approx(-1.0, abs=1e-6)
    checker = (torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)) % 2
    assert r(checker.float().expand(1, 3, 4, 4), ["x"]).item() == pytest.approx(-2.0, abs=1e-6)
    smooth = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    noisy = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert r(smooth, ["x"]).item() > r(noisy, ["x"]).item()


# ---------------------------------------------------------------- contract: dtype, grads, frozen

SIMPLE = ["brightness", "saturation", "colorfulness", "compressibility", "color", "redness"]


@pytest.mark.parametrize("name", SIMPLE)
def test_simple_rewards_are_differentiable_float32(name):
    r = build_reward(name)
    assert isinstance(r, Reward) and not r.training
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    out = r(x, PROMPTS2)
    assert out.shape == (2,) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # bf16 images (as a bf16 VAE decodes them) still give fp32 scores.
    assert r(x.detach().bfloat16(), PROMPTS2).dtype == torch.float32


def test_colorfulness_gradient_finite_on_flat_grey():
    x = solid((0.5, 0.5, 0.5)).requires_grad_(True)
    build_reward("colorfulness")(x, ["x"]).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_reward_stays_in_eval_mode():
    r = build_reward("redness=1,brightness=0.5")
    r.train()
    assert not r.training and all(not m.training for m in r.modules())


# ---------------------------------------------------------------- weighted sums


def test_weighted_sum_equals_sum_of_parts():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    total = build_reward("redness=1.0, brightness=0.5,compressibility=-2")
    assert isinstance(total, WeightedSumReward)
    expected = (
        build_reward("redness")(x, PROMPTS2)
        + 0.5 * build_reward("brightness")(x, PROMPTS2)
        - 2 * build_reward("compressibility")(x, PROMPTS2)
    )
    got = total(x, PROMPTS2)
    torch.testing.assert_close(got, expected)
    assert set(total.last_components) == {"redness", "brightness", "compressibility"}
    torch.testing.assert_close(total.last_components["brightness"], build_reward("brightness")(x, PROMPTS2))
    g_total = torch.autograd.grad(got.sum(), x)[0]
    g_expected = torch.autograd.grad(expected.sum(), x)[0]
    torch.testing.assert_close(g_total, g_expected)


def test_single_weighted_item_scales():
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(
        build_reward("redness=3")(x, PROMPTS2), 3 * build_reward("redness")(x, PROMPTS2)
    )


def test_each_part_evaluated_once_per_batch(tmp_path):
    f = tmp_path / "counting.py"
    f.write_text(
        textwrap.dedent(
            """
            CALLS = []
            def counted(images, prompts):
                CALLS.append(len(prompts))
                return images.mean(dim=(1, 2, 3))
            """
        )
    )
    r = build_reward(f"{f}:counted=2,redness=1")
    r(torch.rand(3, 3, 4, 4), ["a"] * 3)
    from rewards.custom import resolve_custom

    module = sys.modules[resolve_custom(f"{f}:counted").__module__]
    assert module.CALLS == [3]


# ---------------------------------------------------------------- options


def test_options_route_to_parts():
    x = solid((0, 1, 0))
    # unqualified: goes to the part that accepts it (`color`), not to brightness
    r = build_reward("color,brightness=0", target="green")
    assert r(x, ["x"]).item() == pytest.approx(1.0, abs=1e-6)
    # qualified
    r = build_reward("color,brightness=0", **{"color.target": "blue"})
    assert r(x, ["x"]).item() == pytest.approx(-0.5, abs=1e-6)
    # qualified overrides unqualified for its part
    r = build_reward("color", target="red", **{"color.target": "green"})
    assert r(x, ["x"]).item() == pytest.approx(1.0, abs=1e-6)


def test_generic_options_are_ignored_by_model_free_rewards():
    r = build_reward("redness", gradient_checkpointing=True)
    assert r(solid((1, 0, 0)), ["x"]).item() == pytest.approx(1.0)
    validate_reward_spec("brightness,redness=0.5", gradient_checkpointing=True)


def test_bad_options_are_clear_errors():
    with pytest.raises(RewardSpecError, match=r"no reward in the spec takes option 'bogus'"):
        build_reward("redness", bogus=1)
    with pytest.raises(RewardSpecError, match=r"names no part.*parts: redness, brightness"):
        validate_reward_spec("redness,brightness", **{"pickscore.model": "/x"})
    with pytest.raises(RewardSpecError, match=r"'brightness' takes no option 'target'"):
        validate_reward_spec("brightness,color", **{"brightness.target": "red"})
    # redness binds target=red: it does not take it as an option
    with pytest.raises(RewardSpecError, match="takes option 'target'"):
        validate_reward_spec("redness", target="blue")


def test_parse_reward_options_coerces():
    assert parse_reward_options(["a=1", "b=0.5", "c=true", "pickscore.model=/x/y", "d=none"]) == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "pickscore.model": "/x/y",
        "d": None,
    }
    with pytest.raises(RewardSpecError, match="key=value"):
        parse_reward_options(["novalue"])


# ---------------------------------------------------------------- option values: judged before any model loads


@pytest.mark.parametrize(
    ("spec", "options", "pattern"),
    [
        ("color", {"target": "bleu"}, r"^reward 'color': unknown colour 'bleu': use one of red, green"),
        ("color", {"target": "0.5;0.5;0.5"}, r"^reward 'color': colour target '0.5;0.5;0.5' is a grey"),
        ("color", {"target": 5}, r"^reward 'color': colour 5 is neither a name nor 3 numbers"),
        ("brightness,color", {"color.target": "bleu"}, r"^reward 'color': unknown colour 'bleu'"),
        ("saturation", {"eps": "tiny"}, r"^reward 'saturation': option eps='tiny' must be a number"),
        ("pickscore", {"gradient_checkpointing": "maybe"}, r"option gradient_checkpointing='maybe' must be true or false"),
        ("clip", {"cache_size": True}, r"^reward 'clip': option cache_size=True must be a number"),
        ("clip", {"scale": None}, r"option scale=None must be a number"),
        ("aesthetic", {"dtype": "fp8"}, r"^reward 'aesthetic': unknown dtype 'fp8'; use one of fp32, bf16, fp16"),
        ("imagereward", {"dtype": "int8"}, r"^reward 'imagereward': unknown dtype 'int8'"),
    ],
)
def test_bad_option_values_fail_at_validation(spec, options, pattern):
    with pytest.raises(RewardSpecError, match=pattern) as info:
        validate_reward_spec(spec, **options)
    assert "\n" not in str(info.value)


def test_good_option_values_pass_validation():
    validate_reward_spec("color", target="#3366cc")
    validate_reward_spec("color", target="0.2;0.4;0.9")
    validate_reward_spec("saturation,colorfulness", eps=1)  # an int is a number
    validate_reward_spec("pickscore,clip", gradient_checkpointing=False, cache_size=0, dtype="bf16", scale=50)


def test_bad_option_value_fails_before_any_model_loads(monkeypatch):
    # The colour of the second part is judged before the first part's model is even looked for.
    from rewards.clip_common import CLIPFamilyReward

    def no_loading(self, *args, **kwargs):
        raise AssertionError("a reward model was loaded")

    monkeypatch.setattr(CLIPFamilyReward, "__init__", no_loading)
    with pytest.raises(RewardSpecError, match="reward 'color': unknown colour 'bleu'"):
        build_reward("pickscore,color", **{"color.target": "bleu"})


def test_custom_reward_judges_its_own_option_values_at_validation(tmp_path):
    f = tmp_path / "picky.py"
    f.write_text(
        textwrap.dedent(
            """
            from rewards import Reward

            BUILT = []

            class Picky(Reward):
                def __init__(self, level: int = 1):
                    super().__init__()
                    BUILT.append(level)

                @classmethod
                def check_options(cls, **options):
                    super().check_options(**options)
                    if options.get("level", 1) not in (1, 2, 3):
                        raise ValueError("level must be 1, 2 or 3")

                def forward(self, images, prompts):
                    return images.mean(dim=(1, 2, 3))
            """
        )
    )
    with pytest.raises(RewardSpecError, match="^reward 'Picky': level must be 1, 2 or 3$"):
        validate_reward_spec(f"{f}:Picky", level=7)
    with pytest.raises(RewardSpecError, match="option level='high' must be a number"):
        validate_reward_spec(f"{f}:Picky", level="high")
    validate_reward_spec(f"{f}:Picky", level=2)
    from rewards.custom import resolve_custom

    assert sys.modules[resolve_custom(f"{f}:Picky").__module__].BUILT == []  # validation built nothing


# ---------------------------------------------------------------- model references


def test_model_references_default_and_given():
    from rewards import ModelReference, model_references

    assert model_references("redness,brightness=0.5,color", {"target": "blue"}) == []  # model-free
    assert model_references("pickscore=1,aesthetic=0.05,redness") == [
        ("pickscore", "model", "yuvalkirstain/PickScore_v1"),
        ("aesthetic", "model", "openai/clip-vit-large-patch14"),
        ("aesthetic", "head", "trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth"),
    ]
    # Routed as build_reward routes them: unqualified to every part that takes the option,
    # "part.key" to that part only, over the unqualified value.
    refs = model_references("clip,imagereward,aesthetic", {"model": "/m", "imagereward.model": "/ir", "head": "h.pth"})
    assert refs == [
        ModelReference("clip", "model", "/m"),
        ModelReference("imagereward", "model", "/ir"),
        ModelReference("aesthetic", "model", "/m"),
        ModelReference("aesthetic", "head", "h.pth"),
    ]
    # Processors and tokenizers follow the model: not listed.
    assert model_references("pickscore", {"processor": "/p", "tokenizer": "/t"}) == [
        ("pickscore", "model", "yuvalkirstain/PickScore_v1")
    ]


def test_model_references_read_the_class(monkeypatch):
    # The default comes from the signature and the file options from the class: one source each.
    from rewards import model_references
    from rewards.pickscore import PickScoreReward

    monkeypatch.setattr(PickScoreReward.__init__, "__defaults__", ("other/pick",) + PickScoreReward.__init__.__defaults__[1:])
    assert model_references("pickscore") == [("pickscore", "model", "other/pick")]
    monkeypatch.setattr(PickScoreReward, "file_options", ("model", "processor"))
    assert model_references("pickscore")[1] == ("pickscore", "processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


def test_model_references_of_custom_parts(tmp_path):
    from rewards import model_references

    f = tmp_path / "mine.py"
    f.write_text(
        textwrap.dedent(
            """
            from rewards import Reward

            def plain(images, prompts):
                return images.mean(dim=(1, 2, 3))

            class Loaded(Reward):
                file_options = ("weights",)

                def __init__(self, weights: str = "me/my-reward", scale: float = 1.0):
                    super().__init__()
            """
        )
    )
    assert model_references(f"{f}:plain") == []
    assert model_references(f"{f}:Loaded,{f}:plain") == [("Loaded", "weights", "me/my-reward")]
    assert model_references(f"{f}:Loaded", {"Loaded.weights": "/w.safetensors"}) == [
        ("Loaded", "weights", "/w.safetensors")
    ]


def test_model_references_raise_what_validation_raises():
    from rewards import model_references

    with pytest.raises(RewardSpecError, match="unknown reward 'pickscor'"):
        model_references("pickscor")
    with pytest.raises(RewardSpecError, match="no reward in the spec takes option 'bogus'"):
        model_references("pickscore", {"bogus": 1})
    with pytest.raises(RewardSpecError, match="unknown dtype 'fp8'"):
        model_references("pickscore", {"dtype": "fp8"})


# ---------------------------------------------------------------- spec errors


def test_spec_parsing():
    items = parse_reward_spec("pickscore=1.0, aesthetic=0.05,redness")
    assert [(i.label, i.weight) for i in items] == [("pickscore", 1.0), ("aesthetic", 0.05), ("redness", 1.0)]
    assert parse_reward_spec("HPS=2e-1")[0].label == "hpsv2"
    assert parse_reward_spec("dir/my.py:fn=-0.5")[0].weight == -0.5


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        (
            "pickscor",
            r"unknown reward 'pickscor' \(did you mean 'pickscore'\?\); available: .*aesthetic.*brightness.*pickscore.*redness",
        ),
        ("nope", r"unknown reward 'nope'; available: aesthetic, brightness, clip, color, colorfulness"),
        ("", "empty reward spec"),
        ("redness,,brightness", "empty item"),
        ("redness=abc", r"bad weight 'abc'"),
        ("redness=inf", "finite"),
        ("=1", "missing reward name"),
        ("redness,redness=2", "appears twice"),
        (":fn", "bad custom reward"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, pattern):
    with pytest.raises(RewardSpecError, match=pattern) as info:
        validate_reward_spec(spec)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_validate_loads_no_model_library():
    # validate must be cheap: it may not import transformers/open_clip (let alone load weights).
    code = (
        "import sys, rewards; rewards.validate_reward_spec('pickscore=1,aesthetic=0.05,clip,imagereward=0.5,redness', gradient_checkpointing=True);"
        "assert len(rewards.model_references('pickscore=1,aesthetic=0.05,clip,imagereward=0.5,redness')) == 5;"
        "print(rewards.list_rewards());"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('transformers','open_clip','ImageReward','diffusers')];"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(_root()))
    assert out.returncode == 0, out.stderr
    for name in ("pickscore", "hpsv2", "aesthetic", "clip", "imagereward", "redness", "colorfulness"):
        assert any(line.strip().startswith(name) for line in out.stdout.splitlines())


def test_list_rewards_reads_each_class():
    from rewards.catalogue import REWARDS, reward_class

    text = list_rewards()
    for name in REWARDS:
        cls = reward_class(name)
        assert cls.name == name  # the catalogue key and the class agree
        assert cls.description and cls.score_range
        (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(name + " ")]
        assert cls.description in line and cls.score_range in line
    # Defaults come from the signatures: the same values the classes are built with.
    pick = next(ln for ln in text.splitlines() if ln.strip().startswith("pickscore "))
    assert "model=yuvalkirstain/PickScore_v1 processor=laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in pick
    assert "range ~18-24" in pick
    (color,) = [ln for ln in text.splitlines() if ln.strip().startswith("color ")]
    assert "[target=red]" in color


def test_list_rewards_follows_the_class(monkeypatch):
    # One source of truth: changing the class attribute changes the help text.
    from rewards.pickscore import PickScoreReward

    monkeypatch.setattr(PickScoreReward, "score_range", "~1-2 (patched)")
    assert "range ~1-2 (patched)" in list_rewards()


def test_redness_is_color_with_target_fixed():
    from rewards.simple import ColorReward, RednessReward

    assert issubclass(RednessReward, ColorReward)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(build_reward("redness")(x, PROMPTS2), build_reward("color", target="red")(x, PROMPTS2))


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- custom rewards


def test_custom_function_from_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def blueness(images, prompts):\n    return images[:, 2].mean(dim=(1, 2))\n")
    r = build_reward(f"{f}:blueness")
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = r(x, PROMPTS2)
    torch.testing.assert_close(out, x[:, 2].mean(dim=(1, 2)))
    out.sum().backward()
    assert torch.allclose(x.grad[:, 2], torch.full((2, 4, 4), 1 / 16))
    assert r.name == "blueness"


def test_custom_reward_subclass_from_file_gets_its_options(tmp_path):
    f = tmp_path / "scaled.py"
    f.write_text(
        textwrap.dedent(
            """
            from rewards import Reward

            class Scaled(Reward):
                def __init__(self, scale: float = 1.0):
                    super().__init__()
                    self.scale = scale

                def forward(self, images, prompts):
                    return self.scale * images.mean(dim=(1, 2, 3))
            """
        )
    )
    x = torch.rand(2, 3, 4, 4)
    # `target` goes to color only; `scale` to Scaled only; `gradient_checkpointing` to nobody.
    r = build_reward(f"{f}:Scaled=1,color=0.5", scale=3.0, target="blue", gradient_checkpointing=True)
    expected = 3.0 * x.mean(dim=(1, 2, 3)) + 0.5 * build_reward("color", target="blue")(x, PROMPTS2)
    torch.testing.assert_close(r(x, PROMPTS2), expected)
    torch.testing.assert_close(
        build_reward(f"{f}:Scaled", **{"Scaled.scale": 2})(x, PROMPTS2), 2 * x.mean(dim=(1, 2, 3))
    )


def test_custom_from_module_function(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(
        "def greenness(images, prompts):\n    return images[:, 1].mean(dim=(1, 2)) * 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    validate_reward_spec("mypkg.scores:greenness")
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(
        build_reward("mypkg.scores:greenness")(x, PROMPTS2), 2 * x[:, 1].mean(dim=(1, 2))
    )


def test_custom_reward_errors(tmp_path):
    with pytest.raises(RewardSpecError, match="custom reward file not found"):
        validate_reward_spec(f"{tmp_path}/missing.py:fn")
    with pytest.raises(RewardSpecError, match="module 'no_such_pkg_xyz.mod' is not importable"):
        validate_reward_spec("no_such_pkg_xyz.mod:fn")
    f = tmp_path / "r.py"
    f.write_text("def real(images, prompts):\n    return images.mean(dim=(1, 2, 3))\nNOT_CALLABLE = 3\n")
    with pytest.raises(RewardSpecError, match=r"has no attribute 'fake' \(it defines: real\)"):
        validate_reward_spec(f"{f}:fake")
    with pytest.raises(RewardSpecError, match="expected a Reward subclass or a function"):
        validate_reward_spec(f"{f}:NOT_CALLABLE")
    klass = tmp_path / "klass.py"
    klass.write_text(
        "class Scorer:\n    def __call__(self, images, prompts):\n        return images.mean((1, 2, 3))\n"
    )
    with pytest.raises(RewardSpecError, match="is a class but not a rewards.Reward subclass"):
        validate_reward_spec(f"{klass}:Scorer")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RewardSpecError, match="failed to import: RuntimeError: boom"):
        validate_reward_spec(f"{broken}:fn")
    bad_shape = tmp_path / "bad_shape.py"
    bad_shape.write_text("def f(images, prompts):\n    return images.mean()\n")
    # A custom reward breaking the contract when it runs is the user's to fix: a one-line RewardSpecError.
    with pytest.raises(RewardSpecError, match=r"must return shape \[2\]"):
        build_reward(f"{bad_shape}:f")(torch.rand(2, 3, 4, 4), PROMPTS2)
    not_a_tensor = tmp_path / "not_a_tensor.py"
    not_a_tensor.write_text("def f(images, prompts):\n    return [1.0] * len(prompts)\n")
    with pytest.raises(RewardSpecError, match="must return a torch.Tensor of shape \\[B\\], got list"):
        build_reward(f"{not_a_tensor}:f")(torch.rand(2, 3, 4, 4), PROMPTS2)
