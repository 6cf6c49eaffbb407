"""HPSv3 on transformers 5's Qwen2-VL, offline, on a tiny random Qwen2-VL and a tokenizer trained here.

What is checked against something independent of the port:
* preprocessing against transformers' own Qwen2-VL image processors (torchvision and PIL backends) on
  the same pixels: equal where nothing is resized, within uint8 rounding where PIL resizes;
* the token ids against the official chat template rendered by the tokenizer (jinja), with the image
  placeholder expanded as Qwen2VLProcessor does;
* the score against transformers' `Qwen2VLModel.forward` (its own image embedding and scatter) with
  the plain positions HPSv3 was trained with -- and the 3-D positions shown to move the score;
* the pixel gradient against finite differences.
The comparison with HPSv3's own code (transformers 4.45) is `benchmarks/hpsv3_parity.py`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rewards import RewardLoadError, RewardSpecError, build_reward, validate_reward_spec

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import rewards.hpsv3 as hp  # noqa: E402
from rewards.qwen2vl_preprocess import Qwen2VLPreprocessConfig, qwen2vl_pixels, smart_resize  # noqa: E402

PROMPTS = ["a red circle", "a photo of a cat on a white background, watercolor"]
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Qwen/Qwen2-VL-7B-Instruct's chat_template.json, verbatim (the reference the port's rendering is checked on).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Same pixel tolerances as the other rewards (tests/test_rewards_models.py): uint8 rounding only.
PIXEL_MAX = 1.5 / 255 / min(CLIP_STD)
PIXEL_MEAN = 0.5 / 255 / min(CLIP_STD)
OFFICIAL = 448  # 16 x 16 merged patches of 28 pixels: 256 * 28 * 28 pixels, HPSv3's budget


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's special tokens, trained here on HPSv3's own text (small vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([hp.INSTRUCTION, hp.PROMPT_WITH_SPECIAL_TOKEN, *PROMPTS], trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def tiny_config(tokenizer) -> transformers.Qwen2VLConfig:
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    return hp.hpsv3_config(
        vocab_size=len(tokenizer) + 1,  # + <|Reward|>, as HPSv3's resized embedding
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # head_dim 16
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_config={"depth": 2, "embed_dim": 32, "num_heads": 2, "hidden_size": 64, "mlp_ratio": 2},
    )


def to_hpsv3_key(key: str) -> str:
    """HPSv3Model key -> HPSv3.safetensors key (transformers 4.45's Qwen2VLRewardModelBT names)."""
    for ours, theirs in (("backbone.language_model.", "model."), ("backbone.visual.", "visual."), ("head.", "rm_head.")):
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise AssertionError(key)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hpsv3")
    tokenizer = make_tokenizer()
    config = tiny_config(tokenizer)
    torch.manual_seed(0)
    model = hp.build_hpsv3_model(config)
    with torch.no_grad():  # no ones/zeros: a dropped bias or norm weight must show
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name or "ln_q" in name else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    state = {to_hpsv3_key(k): v.contiguous() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = torch.randn(config.text_config.vocab_size, config.text_config.hidden_size)
    full, weights, base = root / "full", root / "weights_only", root / "base"
    for d in (full, weights, base):
        d.mkdir()
    for d in (full, weights):
        save_file(state, str(d / hp.CHECKPOINT_FILE))
    for d in (full, base):
        config.save_pretrained(str(d))
        tokenizer.save_pretrained(str(d))
    return SimpleNamespace(
        full=str(full), weights=str(weights), base=str(base), model=model.eval(), config=config, state=state
    )


@pytest.fixture(scope="module")
def reward(assets):
    return build_reward("hpsv3", model=assets.full)


def uint8_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random uint8 images `[n, 3, H, W]`."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 5, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(n, 3, height, width, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("budget", [(hp.PIXELS, hp.PIXELS), (56 * 56, 28 * 28 * 1280)])
def test_smart_resize_is_transformers_arithmetic(budget):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as official

    for height in range(200, 1100, 37):
        for width in (256, 448, 512, 640, 777, 1024):
            assert smart_resize(height, width, 28, *budget) == official(height, width, 28, *budget)


@pytest.mark.parametrize("size", [(OFFICIAL, OFFICIAL), (224, 896)])  # both already 256 * 28 * 28 pixels
def test_pixels_equal_official_processor_where_nothing_is_resized(size):
    from transformers import Qwen2VLImageProcessor

    images = uint8_images(2, *size)
    official = Qwen2VLImageProcessor(min_pixels=hp.PIXELS, max_pixels=hp.PIXELS)(list(images), return_tensors="pt")
    pixel_values, grid = qwen2vl_pixels(images.float() / 255, Qwen2VLPreprocessConfig())
    assert torch.equal(grid, official["image_grid_thw"])
    torch.testing.assert_close(pixel_values, official["pixel_values"], atol=2e-6, rtol=0)


@pytest.mark.parametrize("size", [(512, 512), (600, 400), (300, 500)])
def test_resized_pixels_match_pil_processor_up_to_uint8_rounding(size):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = uint8_images(2, *size, seed=3)
    pil = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in images]
    official = Qwen2VLImageProcessorPil(min_pixels=hp.PIXELS, max_pixels=hp.PIXELS)(pil, return_tensors="pt")
    pixel_values, grid = qwen2vl_pixels(images.float() / 255, Qwen2VLPreprocessConfig())
    assert torch.equal(grid, official["image_grid_thw"])
    assert int(grid[0].prod()) == 4 * Qwen2VLPreprocessConfig().tokens_per_image(*size)
    diff = (pixel_values - official["pixel_values"]).abs()
    assert diff.max() <= PIXEL_MAX and diff.mean() <= PIXEL_MEAN


def test_preprocessing_is_differentiable():
    images = torch.rand(1, 3, 300, 500, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    pixel_values, _ = qwen2vl_pixels(images, Qwen2VLPreprocessConfig())
    pixel_values.square().sum().backward()
    assert images.grad is not None and (images.grad.abs() > 0).float().mean() > 0.99


def test_bad_pixel_budget_is_one_line():
    with pytest.raises(RewardSpecError, match="min_pixels <= max_pixels") as info:
        Qwen2VLPreprocessConfig(min_pixels=10, max_pixels=5)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- text


def test_tokens_follow_official_chat_template(reward):
    n_image = 7
    input_ids, mask = reward.token_batch(PROMPTS, n_image)
    for i, prompt in enumerate(PROMPTS):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": hp.INSTRUCTION.format(text_prompt=prompt) + hp.PROMPT_WITH_SPECIAL_TOKEN},
                ],
            }
        ]
        text = reward.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=CHAT_TEMPLATE
        )
        text = text.replace(hp.IMAGE_PAD_TOKEN, hp.IMAGE_PAD_TOKEN * n_image)  # as Qwen2VLProcessor expands it
        expected = reward.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert input_ids[i, : len(expected)].tolist() == expected
        assert mask[i].sum() == len(expected)
        assert (input_ids[i, len(expected) :] == reward.tokenizer.pad_token_id).all()  # right padding
        assert input_ids[i].tolist().count(reward.reward_token_id) == 1
    assert reward.reward_token_id == len(reward.tokenizer) - 1  # <|Reward|> added last, as HPSv3 does


def test_prompt_token_ids_are_cached(reward):
    calls = []
    original = reward._encode_text
    reward._encode_text = lambda prompts: (calls.append(list(prompts)), original(prompts))[1]
    try:
        reward.text_cache.clear()
        reward.token_batch(PROMPTS + PROMPTS[:1], 3)
        reward.token_batch(PROMPTS, 5)
    finally:
        del reward._encode_text
    assert calls == [[p] for p in PROMPTS]


# ---------------------------------------------------------------- the score


def transformers_forward(assets, images, prompts, reward, position_ids="plain"):
    """(mu, sigma) through transformers' own `Qwen2VLModel.forward` (its image embedding and scatter)."""
    config = Qwen2VLPreprocessConfig()
    from transformers import Qwen2VLImageProcessor

    processed = Qwen2VLImageProcessor(min_pixels=config.min_pixels, max_pixels=config.max_pixels)(
        list((images * 255).round().to(torch.uint8)), return_tensors="pt"
    )
    n = int(processed["image_grid_thw"][0].prod()) // 4
    input_ids, mask = reward.token_batch(prompts, n)
    length = input_ids.shape[1]
    positions = None if position_ids != "plain" else torch.arange(length).view(1, 1, -1).expand(3, len(prompts), -1)
    with torch.no_grad():
        hidden = assets.model.backbone(
            input_ids=input_ids,
            attention_mask=mask,
            pixel_values=processed["pixel_values"],
            image_grid_thw=processed["image_grid_thw"],
            position_ids=positions,
            mm_token_type_ids=(input_ids == reward.image_token_id).int(),  # 1 = image, as the processor's
            use_cache=False,
        ).last_hidden_state
        at = (input_ids == reward.reward_token_id).int().argmax(1)
        return assets.model.head(hidden[torch.arange(len(prompts)), at])


def test_score_is_mu_of_transformers_forward_with_hpsv3_positions(assets, reward):
    images = uint8_images(2, OFFICIAL, OFFICIAL, seed=5).float() / 255
    with torch.no_grad():
        score = reward(images, PROMPTS)
    mu_sigma = transformers_forward(assets, images, PROMPTS, reward)
    torch.testing.assert_close(score, mu_sigma[:, 0], atol=1e-5, rtol=1e-5)
    # Qwen2-VL's own 3-D positions would be another model: the choice is observable.
    rope3d = transformers_forward(assets, images, PROMPTS, reward, position_ids=None)
    assert (rope3d[:, 0] - score).abs().min() > 100 * (mu_sigma[:, 0] - score).abs().max()
    # The score reads the image: two images, same prompt, two scores.
    with torch.no_grad():
        same_prompt = reward(images, PROMPTS[:1] * 2)
    assert (same_prompt[0] - same_prompt[1]).abs() > 1e-4


def test_scores_do_not_depend_on_batch_padding(reward):
    images = uint8_images(2, OFFICIAL, OFFICIAL, seed=6).float() / 255
    with torch.no_grad():
        together = reward(images, PROMPTS)
        alone = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_gradients_reach_images_not_weights(reward):
    assert not reward.training and all(not p.requires_grad for p in reward.parameters())
    images = torch.rand(2, 3, 300, 400, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = reward(images, PROMPTS)
    assert out.shape == (2,) and out.dtype == torch.float32
    out.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert (images.grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    assert all(p.grad is None for p in reward.parameters())


def test_pixel_gradient_agrees_with_finite_differences(reward):
    x = (uint8_images(1, OFFICIAL, OFFICIAL, seed=8).double() / 255).float()
    # Unit variance per pixel (not a unit vector): the step moves the score well above fp32 rounding.
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    xg = x.clone().requires_grad_(True)
    reward(xg, PROMPTS[:1]).sum().backward()
    analytic = float((xg.grad * direction).sum())
    eps = 1e-3
    with torch.no_grad():
        numeric = float(reward(x + eps * direction, PROMPTS[:1]) - reward(x - eps * direction, PROMPTS[:1])) / (2 * eps)
    assert abs(analytic) > 1e-6
    assert abs(analytic - numeric) <= 2e-2 * abs(numeric)


def test_gradient_checkpointing_same_values_and_grads(assets, reward):
    ckpt = build_reward("hpsv3", model=assets.full, gradient_checkpointing=True)
    calls = {"vision": 0, "text": 0}
    ckpt.model.backbone.visual.blocks[0].attn.register_forward_hook(
        lambda *a: calls.__setitem__("vision", calls["vision"] + 1)
    )
    ckpt.model.backbone.language_model.layers[0].self_attn.register_forward_hook(
        lambda *a: calls.__setitem__("text", calls["text"] + 1)
    )
    results = []
    for r in (reward, ckpt):
        images = torch.rand(2, 3, 320, 320, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        score = r(images, PROMPTS)
        score.sum().backward()
        results.append((score.detach(), images.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert calls == {"vision": 2, "text": 2}  # forward + recomputation in backward, in both parts


def test_bf16_backbone_fp32_head(assets, reward):
    bf16 = build_reward("hpsv3", model=assets.full, dtype="bf16")
    assert {p.dtype for p in bf16.model.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.model.head.parameters()} == {torch.float32}  # HPSv3's rm_head.to(float32)
    images = uint8_images(2, OFFICIAL, OFFICIAL, seed=4).float() / 255
    with torch.no_grad():
        out, ref = bf16(images, PROMPTS), reward(images, PROMPTS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.05 * float(ref.abs().max()) + 1e-3, rtol=0)


def test_weighted_sum_composes(assets, reward):
    images = torch.rand(2, 3, OFFICIAL, OFFICIAL, generator=torch.Generator().manual_seed(2))
    total = build_reward("brightness=1,hpsv3=0.5", **{"hpsv3.model": assets.full})
    brightness = build_reward("brightness")
    with torch.no_grad():
        expected = brightness(images, PROMPTS) + 0.5 * reward(images, PROMPTS)
        torch.testing.assert_close(total(images, PROMPTS), expected)


# ---------------------------------------------------------------- loading and options


def test_loads_weights_dir_plus_base_dir_like_one_dir(assets, reward):
    split = build_reward("hpsv3", model=assets.weights, base=assets.base)
    images = uint8_images(1, OFFICIAL, OFFICIAL, seed=1).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(split(images, PROMPTS[:1]), reward(images, PROMPTS[:1]))


def test_every_checkpoint_weight_is_loaded_and_lm_head_dropped(assets, reward):
    loaded = reward.model.state_dict()
    for key, value in assets.state.items():
        target = hp.map_key(key)
        if key == "lm_head.weight":
            assert target is None
            continue
        torch.testing.assert_close(loaded[target], value, atol=0, rtol=0)
    assert len(loaded) == len(assets.state) - 1


def test_unknown_checkpoint_key_is_one_line(assets, tmp_path):
    from safetensors.torch import save_file

    save_file({**assets.state, "score.weight": torch.zeros(2)}, str(tmp_path / hp.CHECKPOINT_FILE))
    with pytest.raises(RewardLoadError, match="unexpected key 'score.weight'") as info:
        build_reward("hpsv3", model=str(tmp_path), base=assets.base)
    assert "\n" not in str(info.value)


def test_wrong_base_tokenizer_is_one_line(assets, tmp_path):
    from safetensors.torch import save_file

    state = dict(assets.state)
    rows = state["model.embed_tokens.weight"]
    state["model.embed_tokens.weight"] = torch.cat([rows, rows[:3]])  # an embedding of another vocabulary
    save_file(state, str(tmp_path / hp.CHECKPOINT_FILE))
    with pytest.raises(RewardLoadError, match="embedding has") as info:
        build_reward("hpsv3", model=str(tmp_path), base=assets.base)
    assert "\n" not in str(info.value)


def test_missing_files_and_unreachable_hub_are_one_line(assets, tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(RewardLoadError, match="has no HPSv3.safetensors") as info:
        build_reward("hpsv3", model=str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(RewardLoadError, match="directory not found"):
        build_reward("hpsv3", model=str(tmp_path / "nope"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    # Weights only: the base defaults to Qwen/Qwen2-VL-7B-Instruct, not reachable offline (conftest).
    with pytest.raises(RewardLoadError, match="Qwen/Qwen2-VL-7B-Instruct") as info:
        build_reward("hpsv3", model=assets.weights)
    assert "\n" not in str(info.value) and "base" in str(info.value).lower()
    with pytest.raises(RewardLoadError, match="MizzenAI/HPSv3") as info:
        build_reward("hpsv3")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"hpsv3.dtype": "fp8"}, "unknown dtype 'fp8'"),
        ({"hpsv3.gradient_checkpointing": "sometimes"}, "must be true or false"),
        ({"hpsv3.cache_size": "many"}, "must be a number"),
        ({"hpsv3.processor": "/x"}, "'hpsv3' takes no option 'processor'"),
    ],
)
def test_bad_options_fail_in_one_line_before_loading(options, match):
    with pytest.raises(RewardSpecError, match=match) as info:
        validate_reward_spec("pickscore=1,hpsv3=0.5", **options)
    assert "\n" not in str(info.value)


def test_good_options_validate_without_loading():
    validate_reward_spec(
        "pickscore=1,hpsv3=0.5",
        **{"hpsv3.dtype": "bf16", "hpsv3.gradient_checkpointing": True, "hpsv3.base": "/x", "cache_size": 0},
    )


def test_references_list_weights_and_base():
    from rewards import model_references

    refs = {(r.key, r.value) for r in model_references("hpsv3")}
    assert refs == {("model", hp.HPSV3_MODEL), ("base", hp.HPSV3_BASE)}


# ---------------------------------------------------------------- full size, without weights


def test_architecture_config_is_the_published_qwen2_vl_7b():
    config = hp.HPSv3Reward.architecture_config()
    text, vision = config.text_config, config.vision_config
    for key, value in hp.QWEN2_VL_7B_INSTRUCT.items():
        if key in ("vision_config", "rope_scaling", "rope_theta", "vocab_size", "sliding_window"):
            continue
        where = text if key in text.to_dict() else config  # tie_word_embeddings, the vision token ids
        assert getattr(where, key) == value, key
    assert text.vocab_size == hp.HPSV3_VOCAB_SIZE
    assert text.rope_parameters["rope_theta"] == hp.QWEN2_VL_7B_INSTRUCT["rope_theta"]
    assert text.rope_parameters["mrope_section"] == hp.QWEN2_VL_7B_INSTRUCT["rope_scaling"]["mrope_section"]
    assert set(text.layer_types) == {"full_attention"}  # use_sliding_window=False
    for key, value in hp.QWEN2_VL_7B_INSTRUCT["vision_config"].items():
        assert getattr(vision, key) == value, key


def test_full_size_module_builds_on_meta_with_the_expected_parameters():
    config = hp.hpsv3_config()
    with torch.device("meta"):
        model = hp.HPSv3Reward.build_module(config)
    t, v = config.text_config, config.vision_config
    kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    attn = t.hidden_size * (t.hidden_size + 2 * kv) + (t.hidden_size + 2 * kv) + t.hidden_size * t.hidden_size
    layer = attn + 3 * t.hidden_size * t.intermediate_size + 2 * t.hidden_size
    text_params = t.vocab_size * t.hidden_size + t.num_hidden_layers * layer + t.hidden_size
    e, m = v.embed_dim, v.embed_dim * v.mlp_ratio
    block = 4 * e + 3 * e * e + 3 * e + e * e + e + 2 * e * m + m + e
    merged = e * v.spatial_merge_size**2
    vision_params = 3 * v.temporal_patch_size * v.patch_size**2 * e + v.depth * block
    vision_params += 2 * e + merged * merged + merged + merged * v.hidden_size + v.hidden_size
    sizes = (t.hidden_size, *hp.HEAD_SIZES)
    head_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    assert sum(p.numel() for p in model.backbone.language_model.parameters()) == text_params
    assert sum(p.numel() for p in model.backbone.visual.parameters()) == vision_params
    assert sum(p.numel() for p in model.head.parameters()) == head_params
    # Every full-size weight has a checkpoint name that maps back to it (the layout is complete).
    for key in model.state_dict():
        assert hp.map_key(to_hpsv3_key(key)) == key


def test_catalogue_lists_hpsv3():
    from rewards import list_rewards

    line = next(line for line in list_rewards().splitlines() if line.strip().startswith("hpsv3 "))
    assert "Qwen2-VL" in line and f"model={hp.HPSV3_MODEL}" in line and f"base={hp.HPSV3_BASE}" in line


def test_pixels_of_two_token_counts_in_one_batch_are_refused(reward):
    pixel_values, grid = qwen2vl_pixels(torch.rand(1, 3, OFFICIAL, OFFICIAL), Qwen2VLPreprocessConfig())
    small = Qwen2VLPreprocessConfig(min_pixels=64 * 28 * 28, max_pixels=64 * 28 * 28)
    small_pixels, small_grid = qwen2vl_pixels(torch.rand(1, 3, OFFICIAL, OFFICIAL), small)
    with pytest.raises(ValueError, match="one size"):
        reward.score_pixels(torch.cat([pixel_values, small_pixels]), torch.cat([grid, small_grid]), PROMPTS)


def test_the_memory_estimate_counts_hpsv3_by_its_full_size_weights():
    """`--estimate_memory --reward hpsv3` builds Qwen2-VL-7B from HPSv3's architecture (no file read): its weights
    are counted, at about 15.5 GB in bf16, and the estimate says its activations are not traced."""
    from rewards.build import build_reward_from_architectures

    with torch.device("meta"):
        reward, notes = build_reward_from_architectures("hpsv3", dtype=torch.bfloat16)
    params = sum(p.numel() for p in reward.parameters())
    assert 7.6e9 < params < 7.8e9 and all(p.dtype == torch.bfloat16 for p in reward.parameters())
    assert 15.0e9 < 2 * params < 15.6e9
    assert notes == ["reward 'hpsv3': its weights from its architecture; its activations not traced"]
