"""Model-backed rewards against the official (non-differentiable) processor + model path.

Every model is a tiny random one of the real architecture, built from a config and saved to a
temp dir, and every processor is configured like the real one (shortest edge 224, centre crop
224, bicubic, OpenAI CLIP mean/std); the rewards load them through their normal
`model=`/`processor=`/`head=` code path. Nothing is downloaded.

Tolerances. The official path resizes a uint8 PIL image and rounds the result back to uint8;
the reward resizes float tensors with torch's antialiased kernels (the same filters as PIL, in
the same two passes with the same clipping), so resized pixels differ only by rounding: at most
~1.1 grey levels (we allow 1.5/255) and ~0.3 on average (we allow 0.5/255), i.e. <= 0.022 after
dividing by the CLIP std. On these models that moves the L2-normalised image embedding by
||d|| ~ 1.2e-3 (we allow EMB_ATOL = 2.5e-3). A score `scale * cos(img, txt)` then moves by at
most `scale * ||d||` (Cauchy-Schwarz, unit text embedding), so PickScore/CLIP (scale 100) get
atol 0.25, HPSv2 (scale 1) 2.5e-3, and the (linear) aesthetic head `||W||_2 * 2.5e-3`. The two
official transformers 5 backends (PIL and torchvision) differ from each other by as much as we
differ from either. Images that need no resize (224x224, 224x227) match to float precision
(atol 1e-4). A real ViT-H may be more or less sensitive than these tiny random towers; the
pixel-level bounds are the model-independent guarantee.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rewards import RewardLoadError, RewardSpecError, build_reward, validate_reward_spec
from rewards.preprocess import ImagePreprocessConfig, preprocess_images

transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from utils.toys.tiny_models import build_clip_tokenizer  # noqa: E402

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
PROMPTS = ["a red circle", "a photo of a cat", "blue square on a white background"]
BACKENDS = {"pil": CLIPImageProcessorPil, "torchvision": CLIPImageProcessor}
PIXEL_MAX = 1.5 / 255 / min(OPENAI_STD)
PIXEL_MEAN = 0.5 / 255 / min(OPENAI_STD)
EMB_ATOL = 2.5e-3
EXACT_ATOL = 1e-4


def real_like_processor(cls=CLIPImageProcessor):
    """Configured with the values of openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14."""
    return cls(
        do_resize=True,
        size={"shortest_edge": 224},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD,
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny CLIP (saved twice: model-only dir + processor/tokenizer dir, and a full dir) and heads."""
    root = tmp_path_factory.mktemp("tiny-clip")
    proc_dir, model_dir = root / "processor", root / "model"
    tokenizer = build_clip_tokenizer(proc_dir)
    real_like_processor().save_pretrained(proc_dir)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,
            patch_size=32,
        ),
        projection_dim=16,
        logit_scale_init_value=4.6052,  # exp() = 100, as in PickScore / CLIP
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(model_dir)  # model only: the processor comes from `processor=`
    full_dir = root / "full"
    model.save_pretrained(full_dir)
    tokenizer.save_pretrained(full_dir)
    real_like_processor().save_pretrained(full_dir)

    # Aesthetic head with the official layer layout (768 -> 1024 -> 128 -> 64 -> 16 -> 1 in the
    # real one; here the input is the tiny projection_dim), saved as .pth and .safetensors.
    torch.manual_seed(1)
    dims = [16, 1024, 128, 64, 16, 1]
    head_sd = {}
    for index, (d_in, d_out) in zip([0, 2, 4, 6, 7], zip(dims[:-1], dims[1:], strict=True), strict=True):
        head_sd[f"layers.{index}.weight"] = torch.randn(d_out, d_in) / d_in**0.5
        head_sd[f"layers.{index}.bias"] = torch.randn(d_out) * 0.1
    torch.save(head_sd, root / "head.pth")
    from safetensors.torch import save_file

    save_file(head_sd, str(root / "head.safetensors"))
    return SimpleNamespace(
        root=root,
        proc=str(proc_dir),
        model=str(model_dir),
        full=str(full_dir),
        clip=model,
        tokenizer=tokenizer,
        head=head_sd,
    )


@pytest.fixture(scope="module")
def pickscore(assets):
    return build_reward("pickscore", model=assets.model, processor=assets.proc)


def make_images(height: int, width: int, n: int = 3, seed: int = 0):
    """Smooth-ish random uint8 images -> (float tensor in [0, 1] = uint8/255, list of PIL images)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, height // 16 + 2, width // 16 + 2, generator=g)
    smooth = F.interpolate(base, size=(height, width), mode="bicubic", align_corners=False)
    noisy = (0.85 * smooth + 0.15 * torch.rand(n, 3, height, width, generator=g)).clamp(0, 1)
    u8 = (noisy * 255).round().to(torch.uint8)
    pils = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in u8]
    return u8.float() / 255, pils


def official_pixels(processor, pils) -> torch.Tensor:
    return torch.as_tensor(np.asarray(processor(images=pils, return_tensors="pt")["pixel_values"]))


def official_embeds(assets, backend, pils, prompts):
    """The official PickScore/CLIP snippet: processor(...) -> get_*_features -> L2 normalise."""
    processor = CLIPProcessor(
        image_processor=real_like_processor(BACKENDS[backend]), tokenizer=assets.tokenizer
    )
    with torch.no_grad():
        image_inputs = processor(images=pils, return_tensors="pt")
        text_inputs = processor(
            text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        img = assets.clip.get_image_features(**image_inputs).pooler_output
        txt = assets.clip.get_text_features(**text_inputs).pooler_output
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _atol(height, width, scale):
    # No resize needed (shortest edge already 224): pixels are identical, scores exact.
    return EXACT_ATOL if min(height, width) == 224 else scale * EMB_ATOL


SIZES = [(224, 224), (224, 227), (256, 256), (300, 200), (123, 457), (64, 96)]


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_preprocess_matches_official_processor(backend, height, width):
    images, pils = make_images(height, width, n=2)
    processor = real_like_processor(BACKENDS[backend])
    ref = official_pixels(processor, pils)
    got = preprocess_images(images, ImagePreprocessConfig.from_processor(processor))
    assert got.shape == ref.shape == (2, 3, 224, 224)
    diff = (got - ref).abs()
    if min(height, width) == 224:
        assert diff.max() < 1e-5
    else:
        assert diff.max() <= PIXEL_MAX and diff.mean() <= PIXEL_MEAN


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(size={"shortest_edge": 48}, crop_size={"height": 40, "width": 32}, resample=2),
        dict(size={"height": 40, "width": 56}, do_center_crop=False, resample=3),
        dict(
            size={"shortest_edge": 64}, crop_size={"height": 80, "width": 80}, resample=3
        ),  # crop > image: pads
    ],
    ids=["bilinear-crop", "fixed-size", "pad"],
)
def test_preprocess_reads_any_processor_config(kwargs):
    processor = CLIPImageProcessorPil(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], **kwargs)
    images, pils = make_images(70, 90, n=2, seed=3)
    ref = official_pixels(processor, pils)
    got = preprocess_images(images, ImagePreprocessConfig.from_processor(processor))
    assert got.shape == ref.shape
    diff = (got - ref).abs()
    assert diff.max() <= 1.5 / 255 / 0.2 and diff.mean() <= 0.5 / 255 / 0.2


def test_preprocess_gradient_passes_clamped_pixels():
    # A hard edge makes bicubic overshoot outside [0, 1]; the forward clamps it (like uint8),
    # the backward still passes gradient (straight-through), so no pixel goes dark to the reward.
    x = torch.zeros(1, 3, 300, 300)
    x[..., :, 150:] = 1.0
    x.requires_grad_(True)
    cfg = ImagePreprocessConfig(mean=None, std=None)
    out = preprocess_images(x, cfg)
    assert out.min() >= 0 and out.max() <= 1
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(dim=(0, 1, 2)) > 0).float().mean() > 0.9


# ---------------------------------------------------------------- exactness of scores


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(("height", "width"), [(224, 224), (224, 227), (300, 200), (64, 96)])
def test_pickscore_matches_official(assets, pickscore, backend, height, width):
    reward = pickscore
    images, pils = make_images(height, width, seed=height + width)
    img, txt = official_embeds(assets, backend, pils, PROMPTS)
    expected = assets.clip.logit_scale.exp().item() * (img * txt).sum(-1)
    got = reward(images, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (3,)
    with torch.no_grad():
        emb_error = (reward.image_embeds(images) - img).norm(dim=-1).max().item()
    assert emb_error <= (1e-5 if min(height, width) == 224 else EMB_ATOL)
    torch.testing.assert_close(got, expected, atol=_atol(height, width, 100.0), rtol=0)


@pytest.mark.parametrize(("height", "width"), [(224, 224), (300, 200)])
def test_clip_score_matches_official(assets, height, width):
    reward = build_reward("clip", model=assets.full)  # processor + tokenizer in the model dir
    images, pils = make_images(height, width, seed=7)
    img, txt = official_embeds(assets, "pil", pils, PROMPTS)
    torch.testing.assert_close(
        reward(images, PROMPTS), 100 * (img * txt).sum(-1), atol=_atol(height, width, 100.0), rtol=0
    )


@pytest.mark.parametrize("head_file", ["head.pth", "head.safetensors"])
@pytest.mark.parametrize(("height", "width"), [(224, 224), (200, 300)])
def test_aesthetic_matches_official(assets, head_file, height, width):
    reward = build_reward(
        "aesthetic", model=assets.model, processor=assets.proc, head=str(assets.root / head_file)
    )
    images, pils = make_images(height, width, seed=11)
    img, _ = official_embeds(assets, "pil", pils, PROMPTS)
    # The official predictor: MLP on the L2-normalised CLIP image embedding (no activations).
    x = img
    for index in (0, 2, 4, 6, 7):
        x = F.linear(x, assets.head[f"layers.{index}.weight"], assets.head[f"layers.{index}.bias"])
    expected = x[:, 0]
    # The head's gain from embedding to score bounds the error: |dscore| <= ||J|| * |demb|.
    gain = torch.linalg.matrix_norm(
        torch.linalg.multi_dot([assets.head[f"layers.{i}.weight"] for i in (7, 6, 4, 2, 0)]), ord=2
    ).item()
    got = reward(images, PROMPTS)
    torch.testing.assert_close(got, expected, atol=_atol(height, width, gain), rtol=0)


# ---------------------------------------------------------------- gradients, frozen weights, dtype


@pytest.mark.parametrize("name", ["pickscore", "clip", "aesthetic"])
def test_gradients_reach_images_not_weights(assets, name):
    options = dict(model=assets.model, processor=assets.proc)
    if name == "aesthetic":
        options["head"] = str(assets.root / "head.pth")
    reward = build_reward(name, **options)
    assert not reward.training and all(not p.requires_grad for p in reward.parameters())
    images = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    reward(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert (images.grad.abs().sum(dim=(1, 2, 3)) > 0).all()  # every image gets gradient
    assert all(p.grad is None for p in reward.parameters())


def test_gradient_checkpointing_same_values_and_grads_recomputes(assets, pickscore):
    plain = pickscore
    ckpt = build_reward("pickscore", model=assets.model, processor=assets.proc, gradient_checkpointing=True)
    calls = []
    ckpt.model.vision_model.encoder.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    results = []
    for reward in (plain, ckpt):
        images = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        score = reward(images, PROMPTS[:2])
        score.sum().backward()
        results.append((score.detach(), images.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert len(calls) == 2  # forward + recomputation in backward


def test_bf16_scores_are_float32_and_close(assets, pickscore):
    fp32 = pickscore
    bf16 = build_reward("pickscore", model=assets.model, processor=assets.proc, dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    images, _ = make_images(96, 96, n=16, seed=1)
    prompts = (PROMPTS * 6)[:16]
    out, reference = bf16(images, prompts), fp32(images, prompts)
    assert out.dtype == torch.float32
    # Scores are 100 * cos. bf16 keeps 8 mantissa bits: one ulp of a cosine near 1 is 2^-8 = 0.0039, i.e.
    # 0.39 score points. Observed here: max |bf16 - fp32| = 0.86 over 16 images (2.2 ulps), against a spread
    # of scores of std 17.6. Allow 3 ulps, and require the ranking of images to survive.
    assert (out - reference).abs().max() <= 3 * 100 * 2**-8
    assert torch.corrcoef(torch.stack([out, reference]))[0, 1] > 0.995


def test_text_embeddings_cached_per_prompt(assets):
    reward = build_reward("pickscore", model=assets.model, processor=assets.proc, cache_size=8)
    uncached = build_reward("pickscore", model=assets.model, processor=assets.proc, cache_size=0)
    encoded = []
    original = reward._encode_text
    reward._encode_text = lambda prompts: (encoded.append(list(prompts)), original(prompts))[1]
    images, _ = make_images(64, 64, n=3)
    prompts = ["a cat", "a dog", "a cat"]
    first = reward(images, prompts)
    second = reward(images, prompts)
    assert encoded == [["a cat", "a dog"]]
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, uncached(images, prompts))
    reward.to("cpu")  # moving the reward drops embeddings computed on the old device
    assert len(reward.text_cache) == 0


def test_weighted_sum_of_models_evaluates_each_once(assets, pickscore):
    options = {
        "pickscore.model": assets.model,
        "pickscore.processor": assets.proc,
        "aesthetic.model": assets.model,
        "aesthetic.processor": assets.proc,
        "head": str(assets.root / "head.safetensors"),  # unqualified: only aesthetic takes `head`
    }
    validate_reward_spec("pickscore=1.0,aesthetic=0.05,redness=2", **options)
    total = build_reward("pickscore=1.0,aesthetic=0.05,redness=2", **options)
    counts = {"pickscore": 0, "aesthetic": 0}
    for part in total.rewards:
        if part.name in counts:
            part.model.vision_model.embeddings.register_forward_hook(
                lambda *a, _n=part.name: counts.__setitem__(_n, counts[_n] + 1)
            )
    images, _ = make_images(80, 64, n=2)
    images.requires_grad_(True)
    got = total(images, PROMPTS[:2])
    assert counts == {"pickscore": 1, "aesthetic": 1}
    pick = pickscore(images, PROMPTS[:2])
    aes = build_reward("aesthetic", model=assets.model, processor=assets.proc, head=options["head"])(
        images, PROMPTS[:2]
    )
    red = build_reward("redness")(images, PROMPTS[:2])
    torch.testing.assert_close(got, pick + 0.05 * aes + 2 * red)
    got.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


# ---------------------------------------------------------------- loading errors and safety


def test_missing_local_model_is_one_clear_line(tmp_path):
    with pytest.raises(RewardLoadError, match="pass a local directory") as info:
        build_reward("pickscore", model=str(tmp_path / "nope"), processor=str(tmp_path / "nope"))
    assert "\n" not in str(info.value)


def test_aesthetic_head_errors(assets, tmp_path):
    common = dict(model=assets.model, processor=assets.proc)
    with pytest.raises(RewardLoadError, match="aesthetic head not found"):
        build_reward("aesthetic", head=str(tmp_path / "missing.pth"), **common)
    # A pickle holding more than tensors is refused (weights_only=True), not executed.
    torch.save({"layers.0.weight": torch.zeros(1, 16), "extra": SimpleNamespace(a=1)}, tmp_path / "evil.pth")
    with pytest.raises(RewardLoadError, match="weights_only=True"):
        build_reward("aesthetic", head=str(tmp_path / "evil.pth"), **common)
    torch.save(
        {"layers.0.weight": torch.zeros(1, 768), "layers.0.bias": torch.zeros(1)}, tmp_path / "wide.pth"
    )
    with pytest.raises(RewardLoadError, match="expects 768-d embeddings"):
        build_reward("aesthetic", head=str(tmp_path / "wide.pth"), **common)


def test_one_linear_head_for_aesthetic_and_imagereward():
    """The aesthetic head, read from its released keys, is the head ImageReward builds: same layers, same keys."""
    from rewards.mlp_head import LinearHead

    torch.manual_seed(0)
    released = LinearHead(768)  # ImageReward's head, built from the released layout
    state = {f"model.{k}": v for k, v in released.state_dict().items()}  # keys as some .pth files prefix them
    head = LinearHead.from_state_dict(state, "aesthetic head")
    assert [type(m) for m in head.layers] == [type(m) for m in released.layers]
    assert sorted(head.state_dict()) == sorted(released.state_dict()) == sorted(
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")
    )
    head.eval()
    x = torch.randn(3, 768)
    expected = x
    for index in (0, 2, 4, 6, 7):  # purely linear: the chain of the released Linear layers
        expected = F.linear(expected, state[f"model.layers.{index}.weight"], state[f"model.layers.{index}.bias"])
    torch.testing.assert_close(head(x), expected)
    # Any linear chain with those key names loads; a broken chain or another key is one clear line.
    small = LinearHead.from_state_dict({"layers.0.weight": torch.ones(1, 4)}, "aesthetic head")
    assert small(torch.ones(2, 4)).tolist() == [[4.0], [4.0]]
    broken = {"layers.0.weight": torch.zeros(8, 4), "layers.2.weight": torch.zeros(1, 5)}
    with pytest.raises(RewardLoadError, match="aesthetic head is not a chain of Linear layers: .*size mismatch"):
        LinearHead.from_state_dict(broken, "aesthetic head")
    with pytest.raises(RewardLoadError, match="unexpected key 'proj' in aesthetic head"):
        LinearHead.from_state_dict({"proj": torch.zeros(1, 4)}, "aesthetic head")


def test_hpsv2_without_open_clip_names_the_extra(monkeypatch):
    import importlib.util
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "open_clip" else real_find_spec(n, *a)
    )
    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` now raises ImportError
    with pytest.raises(
        RewardSpecError, match=r"needs the optional package open_clip: pip install open_clip_torch"
    ):
        validate_reward_spec("pickscore,hpsv2=0.5")
    from rewards.hpsv2 import HPSv2Reward

    with pytest.raises(RewardLoadError, match="pip install open_clip_torch==3.3.0"):
        HPSv2Reward(model="unused.pt")


# ---------------------------------------------------------------- where processor and tokenizer come from


@pytest.fixture(scope="module")
def own_files_dir(assets, tmp_path_factory):
    """A local CLIP directory carrying its own processor (mean/std 0.5) and tokenizer (max length 32)."""
    path = tmp_path_factory.mktemp("clip-own-files")
    assets.clip.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ).save_pretrained(path)  # fmt: skip
    build_clip_tokenizer(path, model_max_length=32)
    return str(path)


@pytest.mark.parametrize("name", ["pickscore", "clip", "aesthetic"])
def test_model_dir_with_its_own_processor_needs_only_model(assets, own_files_dir, name):
    options = {"head": str(assets.root / "head.pth")} if name == "aesthetic" else {}
    reward = build_reward(name, model=own_files_dir, **options)  # offline: no hub default reachable
    assert reward.preprocess_config.mean == (0.5, 0.5, 0.5)  # read from the model directory
    if name != "aesthetic":
        assert reward.tokenizer.model_max_length == 32
    # An explicit processor= still wins over the directory's.
    explicit = build_reward(name, model=own_files_dir, processor=assets.proc, **options)
    assert explicit.preprocess_config.mean == tuple(OPENAI_MEAN)


def test_model_dir_without_processor_keeps_the_official_default(assets):
    # PickScore's official processor is LAION's CLIP-H: still the default when the directory has
    # none (offline, so loading it fails -- naming it proves it was the one asked for).
    with pytest.raises(RewardLoadError, match="laion/CLIP-ViT-H-14-laion2B-s32B-b79K") as info:
        build_reward("pickscore", model=assets.model)
    assert "\n" not in str(info.value)


def test_tokenizer_from_model_dir_processor_from_elsewhere(assets, tmp_path):
    assets.clip.save_pretrained(tmp_path)
    build_clip_tokenizer(tmp_path, model_max_length=40)  # tokenizer here, no preprocessor_config.json
    reward = build_reward("pickscore", model=str(tmp_path), processor=assets.proc)
    assert reward.tokenizer.model_max_length == 40  # the model directory's, not the processor's (77)
    assert reward.preprocess_config.mean == tuple(OPENAI_MEAN)


# ---------------------------------------------------------------- HPSv2 (only with open_clip installed)


@pytest.fixture(scope="module")
def hps_assets(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("tiny-hps")
    # A tiny config of the ViT-H-14 family layout (open_clip's own tokenizer: vocab 49408).
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    config_path = root / "tiny-hps-vit.json"
    config_path.write_text(json.dumps(config))
    open_clip.add_model_config(config_path)
    torch.manual_seed(2)
    model, _, preprocess_val = open_clip.create_model_and_transforms(
        "tiny-hps-vit", pretrained=None, output_dict=True
    )
    model.eval()
    torch.save({"state_dict": model.state_dict()}, root / "HPS_tiny.pt")  # the HPS checkpoint layout
    return SimpleNamespace(
        model=model,
        preprocess=preprocess_val,
        tokenizer=open_clip.get_tokenizer("tiny-hps-vit"),
        ckpt=str(root / "HPS_tiny.pt"),
        arch=str(config_path),
    )


@pytest.mark.parametrize(("height", "width"), [(224, 224), (224, 227), (300, 200)])
def test_hpsv2_matches_official(hps_assets, height, width):
    reward = build_reward("hpsv2", model=hps_assets.ckpt, arch=hps_assets.arch)
    images, pils = make_images(height, width, seed=13)
    with torch.no_grad():  # hpsv2.score: preprocess_val -> model(image, text) -> diag(img @ txt.T)
        out = hps_assets.model(
            torch.stack([hps_assets.preprocess(p) for p in pils]), hps_assets.tokenizer(PROMPTS)
        )
        expected = (out["image_features"] @ out["text_features"].T).diagonal()
    torch.testing.assert_close(reward(images, PROMPTS), expected, atol=_atol(height, width, 1.0), rtol=0)
    x = images.clone().requires_grad_(True)
    reward(x, PROMPTS).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    ckpt = build_reward("hpsv2", model=hps_assets.ckpt, arch=hps_assets.arch, gradient_checkpointing=True)
    y = images.clone().requires_grad_(True)
    ckpt(y, PROMPTS).sum().backward()
    torch.testing.assert_close(y.grad, x.grad)
