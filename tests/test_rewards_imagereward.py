"""ImageReward port against an independent reference, offline, on tiny random weights.

The reference below is a plain-torch forward written from ImageReward's original code (BLIP's
`vit.py` + `med.py`, `ImageReward.score`): it reads the checkpoint in ImageReward's own key
names, so it shares nothing with the port but the weights. The port (transformers'
`BlipVisionModel` + `BlipTextModel`, the key mapping, the configs) must reproduce it to fp32
precision; a wrong LayerNorm eps, head count, attention mask or [CLS] token would not.

The tiny checkpoint keeps the real layout (ViT patch 16 at 224 -> 197 tokens, 64-d ViT heads,
35 text tokens, the 768->...->1 head shape but for a 64-d input) with small sizes. Its image
embeddings are small (~1e-3), so the first LayerNorm sees a variance near its eps: that makes the
eps observable here, as it is in the real model (where 1e-5 instead of 1e-6 moves the score by
~1.5e-3). The real-size configuration is checked by building configs and meta-device models.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from rewards import RewardLoadError, RewardSpecError, build_reward, validate_reward_spec

transformers = pytest.importorskip("transformers")
torchvision_transforms = pytest.importorskip("torchvision.transforms")

import rewards.imagereward as ir  # noqa: E402
from rewards.mlp_head import LinearHead  # noqa: E402
from rewards.preprocess import preprocess_images  # noqa: E402

PROMPTS = ["a red circle", "a photo of a cat on a white background", "blue squares and dogs"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Same pixel tolerances as the other rewards (tests/test_rewards_models.py): uint8 rounding only.
PIXEL_MAX = 1.5 / 255 / min(CLIP_STD)
PIXEL_MEAN = 0.5 / 255 / min(CLIP_STD)
SCORE_ATOL = 2e-5  # port vs reference on identical pixels, fp32

# ImageReward's med_config.json (THUDM/ImageReward), verbatim.
REAL_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}
REAL_SIZES = dict(
    width=1024,
    depth=24,
    mlp=4096,
    patch=16,
    grid=14,
    text_hidden=768,
    text_layers=12,
    text_inter=3072,
    vocab=30524,
    max_pos=512,
)
TINY_SIZES = dict(
    width=128, depth=2, mlp=256, patch=16, grid=14, text_hidden=64, text_layers=2, text_inter=128, max_pos=40
)
TINY_TEXT_HEADS = 4
TINY_VIT_HEADS = 2  # 128 / 64: BLIP ViT heads are 64-d

WORDS = "a red circle photo of cat on white background blue square and dog the ##s green tree".split()


def bert_like_vocab() -> list[str]:
    """bert-base-uncased's special-token layout ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102) + a few words."""
    return ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS


def imagereward_state_dict(
    *,
    width,
    depth,
    mlp,
    patch,
    grid,
    text_hidden,
    text_layers,
    text_inter,
    vocab,
    max_pos,
    device="cpu",
    seed=0,
    embed_scale=1e-3,
) -> dict[str, torch.Tensor]:
    """A checkpoint in ImageReward.pt's key names and shapes (BLIP_Pretrain + MLP), random values."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def put(key, shape, kind):
        if device == "meta":
            sd[key] = torch.empty(shape, device="meta")
        elif kind == "ln_w":
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif kind == "bias":
            sd[key] = 0.05 * torch.randn(shape, generator=g)
        elif kind == "linear":
            sd[key] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        elif kind == "small":
            sd[key] = embed_scale * torch.randn(shape, generator=g)
        else:
            sd[key] = torch.randn(shape, generator=g)

    def linear(prefix, d_out, d_in):
        put(prefix + ".weight", (d_out, d_in), "linear")
        put(prefix + ".bias", (d_out,), "bias")

    def layer_norm(prefix, dim):
        put(prefix + ".weight", (dim,), "ln_w")
        put(prefix + ".bias", (dim,), "bias")

    v = "blip.visual_encoder."
    put(v + "cls_token", (1, 1, width), "small")
    put(v + "pos_embed", (1, grid * grid + 1, width), "small")
    put(v + "patch_embed.proj.weight", (width, 3, patch, patch), "small")
    put(v + "patch_embed.proj.bias", (width,), "small")
    for i in range(depth):
        b = f"{v}blocks.{i}."
        layer_norm(b + "norm1", width)
        linear(b + "attn.qkv", 3 * width, width)
        linear(b + "attn.proj", width, width)
        layer_norm(b + "norm2", width)
        linear(b + "mlp.fc1", mlp, width)
        linear(b + "mlp.fc2", width, mlp)
    layer_norm(v + "norm", width)

    t = "blip.text_encoder."
    put(t + "embeddings.word_embeddings.weight", (vocab, text_hidden), "normal")
    put(t + "embeddings.position_embeddings.weight", (max_pos, text_hidden), "normal")
    layer_norm(t + "embeddings.LayerNorm", text_hidden)
    sd[t + "embeddings.position_ids"] = torch.arange(max_pos, device=device).expand(1, -1).clone()
    for i in range(text_layers):
        p = f"{t}encoder.layer.{i}."
        for name, kv_width in (("attention", text_hidden), ("crossattention", width)):
            linear(p + name + ".self.query", text_hidden, text_hidden)
            linear(p + name + ".self.key", text_hidden, kv_width)
            linear(p + name + ".self.value", text_hidden, kv_width)
            linear(p + name + ".output.dense", text_hidden, text_hidden)
            layer_norm(p + name + ".output.LayerNorm", text_hidden)
        linear(p + "intermediate.dense", text_inter, text_hidden)
        linear(p + "output.dense", text_hidden, text_inter)
        layer_norm(p + "output.LayerNorm", text_hidden)
    linear("blip.vision_proj", 256, width)
    linear("blip.text_proj", 256, text_hidden)
    for index, (d_in, d_out) in zip(
        (0, 2, 4, 6, 7), [(text_hidden, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)], strict=True
    ):
        linear(f"mlp.layers.{index}", d_out, d_in)
    return sd


# ---------------------------------------------------------------- the reference (ImageReward's semantics)


def reference_score(sd, pixels, input_ids, attention_mask, *, vit_heads, text_heads, causal=False):
    """ImageReward.score on preprocessed pixels and token ids, from the original code's semantics."""

    def v(key):
        return sd["blip.visual_encoder." + key]

    # vit.py VisionTransformer.forward: patch embed, [cls], + pos_embed, pre-norm blocks, final norm.
    batch = pixels.shape[0]
    patch_w = v("patch_embed.proj.weight")
    width, patch = patch_w.shape[0], patch_w.shape[-1]
    x = F.conv2d(pixels, patch_w, v("patch_embed.proj.bias"), stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([v("cls_token").expand(batch, -1, -1), x], dim=1)
    x = x + v("pos_embed")[:, : x.shape[1]]
    depth = len({k.split(".")[3] for k in sd if k.startswith("blip.visual_encoder.blocks.")})
    head_dim = width // vit_heads
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (width,), v(b + "norm1.weight"), v(b + "norm1.bias"), eps=1e-6)
        n = h.shape[1]
        qkv = F.linear(h, v(b + "attn.qkv.weight"), v(b + "attn.qkv.bias"))
        q, k, val = qkv.reshape(batch, n, 3, vit_heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(dim=-1)
        h = (attn @ val).transpose(1, 2).reshape(batch, n, width)
        x = x + F.linear(h, v(b + "attn.proj.weight"), v(b + "attn.proj.bias"))
        h = F.layer_norm(x, (width,), v(b + "norm2.weight"), v(b + "norm2.bias"), eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, v(b + "mlp.fc1.weight"), v(b + "mlp.fc1.bias"))),
            v(b + "mlp.fc2.weight"),
            v(b + "mlp.fc2.bias"),
        )
        x = x + h
    image_embeds = F.layer_norm(x, (width,), v("norm.weight"), v("norm.bias"), eps=1e-6)

    def t(key):
        return sd["blip.text_encoder." + key]

    # med.py BertModel (mode="multimodal"): word + absolute position embeddings, post-norm layers,
    # self-attention with the extended padding mask, then cross-attention to every image token.
    hidden = t("embeddings.word_embeddings.weight").shape[1]
    length = input_ids.shape[1]
    eps = 1e-12
    x = (
        t("embeddings.word_embeddings.weight")[input_ids]
        + t("embeddings.position_embeddings.weight")[:length]
    )
    x = F.layer_norm(x, (hidden,), t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"), eps=eps)
    keep = attention_mask[:, None, None, :].float()
    if causal:
        keep = keep * torch.tril(torch.ones(length, length))[None, None]
    self_bias = (1.0 - keep) * -10000.0  # get_extended_attention_mask
    dim = hidden // text_heads

    def split(y):
        return y.reshape(y.shape[0], y.shape[1], text_heads, dim).transpose(1, 2)

    def attention(prefix, states, context, bias):
        q = split(F.linear(states, t(prefix + "self.query.weight"), t(prefix + "self.query.bias")))
        k = split(F.linear(context, t(prefix + "self.key.weight"), t(prefix + "self.key.bias")))
        val = split(F.linear(context, t(prefix + "self.value.weight"), t(prefix + "self.value.bias")))
        scores = q @ k.transpose(-1, -2) / dim**0.5
        if bias is not None:
            scores = scores + bias
        ctx = (scores.softmax(dim=-1) @ val).transpose(1, 2).reshape(states.shape)
        out = F.linear(ctx, t(prefix + "output.dense.weight"), t(prefix + "output.dense.bias"))
        return F.layer_norm(
            out + states,
            (hidden,),
            t(prefix + "output.LayerNorm.weight"),
            t(prefix + "output.LayerNorm.bias"),
            eps=eps,
        )

    layers = len({k.split(".")[4] for k in sd if k.startswith("blip.text_encoder.encoder.layer.")})
    for i in range(layers):
        p = f"encoder.layer.{i}."
        x = attention(p + "attention.", x, x, self_bias)
        x = attention(p + "crossattention.", x, image_embeds, None)  # image_atts are all ones
        h = F.gelu(F.linear(x, t(p + "intermediate.dense.weight"), t(p + "intermediate.dense.bias")))
        h = F.linear(h, t(p + "output.dense.weight"), t(p + "output.dense.bias"))
        x = F.layer_norm(
            h + x, (hidden,), t(p + "output.LayerNorm.weight"), t(p + "output.LayerNorm.bias"), eps=eps
        )

    # ImageReward.score: MLP on last_hidden_state[:, 0] (ReLUs commented out), then normalise.
    feat = x[:, 0].float()
    for index in (0, 2, 4, 6, 7):
        feat = F.linear(feat, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
    return ((feat - 0.16717362830052426) / 1.0333394966054072)[:, 0]


def official_pixels(pils) -> torch.Tensor:
    """ImageReward's `_transform(224)` on PIL images (torchvision)."""
    tf = torchvision_transforms
    transform = tf.Compose(
        [
            tf.Resize(224, interpolation=tf.InterpolationMode.BICUBIC),
            tf.CenterCrop(224),
            lambda image: image.convert("RGB"),
            tf.ToTensor(),
            tf.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    return torch.stack([transform(p) for p in pils])


def make_images(height: int, width: int, n: int = 3, seed: int = 0):
    """Smooth-ish random uint8 images -> (float tensor in [0, 1] = uint8/255, list of PIL images)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, height // 16 + 2, width // 16 + 2, generator=g)
    smooth = F.interpolate(base, size=(height, width), mode="bicubic", align_corners=False)
    noisy = (0.85 * smooth + 0.15 * torch.rand(n, 3, height, width, generator=g)).clamp(0, 1)
    u8 = (noisy * 255).round().to(torch.uint8)
    return u8.float() / 255, [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in u8]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A local ImageReward directory: ImageReward.pt + med_config.json + a bert-like vocab.txt."""
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("tiny-imagereward")
    model_dir, weights_only_dir, tok_dir = root / "model", root / "weights-only", root / "tokenizer"
    for d in (model_dir, weights_only_dir, tok_dir):
        d.mkdir()
        (d / "vocab.txt").write_text("\n".join(bert_like_vocab()) + "\n")
    (weights_only_dir / "vocab.txt").unlink()
    tokenizer = BertTokenizer.from_pretrained(str(tok_dir))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    vocab = len(tokenizer)  # + [DEC], [ENC], as 30522 + 2 = 30524 for bert-base-uncased
    med = dict(
        REAL_MED_CONFIG,
        hidden_size=TINY_SIZES["text_hidden"],
        num_hidden_layers=TINY_SIZES["text_layers"],
        num_attention_heads=TINY_TEXT_HEADS,
        intermediate_size=TINY_SIZES["text_inter"],
        vocab_size=vocab,
        max_position_embeddings=TINY_SIZES["max_pos"],
    )
    sd = imagereward_state_dict(**TINY_SIZES, vocab=vocab)
    for d in (model_dir, weights_only_dir):
        torch.save(sd, d / "ImageReward.pt")  # a plain torch.save(state_dict), as the real one
        (d / "med_config.json").write_text(json.dumps(med))
    return SimpleNamespace(
        model=str(model_dir),
        weights_only=str(weights_only_dir),
        tokenizer_dir=str(tok_dir),
        tokenizer=tokenizer,
        sd=sd,
        med=med,
    )


@pytest.fixture(scope="module")
def reward(assets):
    return build_reward("imagereward", model=assets.model)


def tokens(assets, prompts):
    enc = assets.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def reference(assets, pixels, prompts, **kwargs):
    ids, mask = tokens(assets, prompts)
    kwargs = {"vit_heads": TINY_VIT_HEADS, "text_heads": TINY_TEXT_HEADS, **kwargs}
    with torch.no_grad():
        return reference_score(assets.sd, pixels, ids, mask, **kwargs)


# ---------------------------------------------------------------- faithfulness


@pytest.mark.parametrize(("height", "width"), [(224, 224), (224, 227)])
def test_matches_reference_end_to_end(assets, reward, height, width):
    # No resize needed: the port's pixels equal torchvision's, so the scores must agree to fp32.
    images, pils = make_images(height, width, seed=height + width)
    expected = reference(assets, official_pixels(pils), PROMPTS)
    got = reward(images, PROMPTS)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, expected, atol=SCORE_ATOL, rtol=0)
    assert expected.std() > 100 * SCORE_ATOL  # the images are told apart: the comparison has teeth


def test_matches_reference_on_shared_pixels(assets, reward):
    # Any pixels (not only what the preprocessing produces): the model part alone.
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = reward.score_pixels(pixels, PROMPTS)
    torch.testing.assert_close(got, reference(assets, pixels, PROMPTS), atol=SCORE_ATOL, rtol=0)


def _wrong_config(monkeypatch, mutation):
    if mutation == "vit_eps_1e-5":  # transformers' BlipVisionConfig default
        monkeypatch.setattr(ir, "VIT_LAYER_NORM_EPS", 1e-5)
    elif mutation == "vit_heads_4":
        monkeypatch.setattr(ir, "VIT_HEAD_DIM", 32)
    else:  # "text_heads_8": BlipTextConfig's default instead of med_config's 12 (here 4)
        real = ir.text_config
        monkeypatch.setattr(
            ir,
            "text_config",
            lambda med, encoder_width: real({**med, "num_attention_heads": 8}, encoder_width),
        )


@pytest.mark.parametrize("mutation", ["vit_eps_1e-5", "vit_heads_4", "text_heads_8"])
def test_reference_catches_a_wrong_config(assets, monkeypatch, mutation):
    """A port built with a wrong eps or head count misses the reference far beyond the tolerance."""
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    _wrong_config(monkeypatch, mutation)
    wrong = build_reward("imagereward", model=assets.model)
    with torch.no_grad():
        got = wrong.score_pixels(pixels, PROMPTS)
    assert (got - reference(assets, pixels, PROMPTS)).abs().max() > 100 * SCORE_ATOL


@pytest.mark.parametrize("mutation", ["causal_mask", "enc_token_first"])
def test_reference_catches_a_wrong_text_forward(assets, reward, mutation):
    """The port's towers driven the wrong way (causal self-attention, [ENC] instead of [CLS])."""
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    ids, mask = tokens(assets, PROMPTS)
    if mutation == "enc_token_first":
        ids[:, 0] = assets.tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        image_embeds = reward.vision(pixel_values=pixels).last_hidden_state
        hidden = reward.text(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            is_decoder=mutation == "causal_mask",
        ).last_hidden_state
        got = (reward.head(hidden[:, 0])[:, 0] - ir.SCORE_MEAN) / ir.SCORE_STD
    assert (got - reference(assets, pixels, PROMPTS)).abs().max() > 100 * SCORE_ATOL
    if mutation == "causal_mask":  # the reference agrees on what is_decoder=True would compute
        causal = reference(assets, pixels, PROMPTS, causal=True)
        torch.testing.assert_close(got, causal, atol=SCORE_ATOL, rtol=0)


def test_dropout_is_off_in_eval(assets, reward):
    # The dropouts exist (p > 0: med_config's 0.1 and the head's 0.2/0.1), so the test can fail...
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in reward.head.modules())
    assert reward.text.config.hidden_dropout_prob > 0
    # ... but a trainer calling .train() on everything cannot switch them on.
    reward.train()
    assert not any(m.training for m in reward.modules())
    images, _ = make_images(224, 224, n=2, seed=5)
    torch.manual_seed(0)
    first = reward(images, PROMPTS[:2])
    torch.manual_seed(1)
    torch.testing.assert_close(reward(images, PROMPTS[:2]), first, atol=0, rtol=0)


# ---------------------------------------------------------------- configuration facts (real sizes)


def test_real_vision_config_facts():
    cfg = ir.vision_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        1024,
        24,
        16,
        4096,
    )
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_act, cfg.layer_norm_eps) == (224, 16, "gelu", 1e-6)


def test_real_text_config_facts():
    cfg = ir.text_config(REAL_MED_CONFIG, encoder_width=1024)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (cfg.layer_norm_eps, cfg.vocab_size, cfg.hidden_act, cfg.encoder_hidden_size) == (
        1e-12,
        30524,
        "gelu",
        1024,
    )
    assert cfg.is_decoder  # needed for transformers to build the cross-attention layers
    with pytest.raises(RewardLoadError, match="add_cross_attention"):
        ir.text_config({**REAL_MED_CONFIG, "add_cross_attention": False}, encoder_width=1024)
    with pytest.raises(RewardLoadError, match="no 'num_attention_heads'"):
        ir.text_config({k: v for k, v in REAL_MED_CONFIG.items() if k != "num_attention_heads"}, 1024)


def test_score_constants_and_head_are_imagereward_s():
    assert ir.SCORE_MEAN == 0.16717362830052426 and ir.SCORE_STD == 1.0333394966054072
    assert ir.MAX_LENGTH == 35 and ir.IMAGE_SIZE == 224
    head = LinearHead(768)
    kinds = [type(m).__name__ for m in head.layers]
    assert kinds == ["Linear", "Dropout", "Linear", "Dropout", "Linear", "Dropout", "Linear", "Linear"]
    assert [m.out_features for m in head.layers if isinstance(m, nn.Linear)] == [1024, 128, 64, 16, 1]
    # Purely linear (no ReLU): the head of a sum is the sum of the heads, minus one bias chain.
    head.eval()
    x, y = torch.randn(4, 768), torch.randn(4, 768)
    torch.testing.assert_close(head(x + y) - head(y), head(x) - head(torch.zeros(1, 768)), atol=1e-4, rtol=0)


def test_real_size_key_mapping_covers_every_weight():
    """ImageReward.pt's real names and shapes land on every parameter of the real-size port (meta tensors)."""
    from transformers import BlipTextModel, BlipVisionModel

    sd = imagereward_state_dict(**REAL_SIZES, device="meta")
    parts = ir.split_state_dict(sd)
    vision_cfg = ir.vision_config_from_state_dict(parts["vision"])
    assert vision_cfg.to_dict() == ir.vision_config().to_dict()  # shapes -> exactly ViT-L/16 at 224
    with torch.device("meta"):
        vision = BlipVisionModel(vision_cfg)
        text = BlipTextModel(ir.text_config(REAL_MED_CONFIG, vision_cfg.hidden_size), add_pooling_layer=False)
    head = LinearHead(768)
    for module, part in ((vision, "vision"), (text, "text"), (head, "head")):
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in parts[part].items()} == expected, part
    dropped = {k for k in sd if ir.map_key(k) is None}
    assert dropped == {
        "blip.text_encoder.embeddings.position_ids",
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
    }


def test_key_mapping_round_trip_loads_every_parameter(assets, reward):
    parts = ir.split_state_dict(assets.sd)
    for module, part in ((reward.vision, "vision"), (reward.text, "text"), (reward.head, "head")):
        state = module.state_dict()
        assert set(parts[part]) == set(state), part  # every parameter comes from the checkpoint
        for key, value in parts[part].items():
            assert torch.equal(state[key], value), key
    # Spot checks of the renames the issue lists.
    v = "blip.visual_encoder."
    assert ir.map_key(v + "cls_token") == ("vision", "embeddings.class_embedding")
    assert ir.map_key(v + "pos_embed") == ("vision", "embeddings.position_embedding")
    assert ir.map_key(v + "patch_embed.proj.weight") == ("vision", "embeddings.patch_embedding.weight")
    assert ir.map_key(v + "blocks.7.norm2.bias") == ("vision", "encoder.layers.7.layer_norm2.bias")
    assert ir.map_key(v + "blocks.3.attn.qkv.weight") == ("vision", "encoder.layers.3.self_attn.qkv.weight")
    assert ir.map_key(v + "blocks.3.attn.proj.bias") == (
        "vision",
        "encoder.layers.3.self_attn.projection.bias",
    )
    assert ir.map_key(v + "blocks.0.mlp.fc2.weight") == ("vision", "encoder.layers.0.mlp.fc2.weight")
    assert ir.map_key(v + "norm.weight") == ("vision", "post_layernorm.weight")
    assert ir.map_key("mlp.layers.7.bias") == ("head", "layers.7.bias")


@pytest.mark.parametrize(
    "key", ["itm_head.weight", "blip.visual_encoder.blocks.0.attn.q_bias", "mlp.layers.1.weight", "blip.temp"]
)
def test_unknown_key_fails_loudly(assets, tmp_path, key):
    with pytest.raises(RewardLoadError, match="unexpected key") as info:
        ir.map_key(key)
    assert key in str(info.value)
    # ... and through the loader, as one line.
    (tmp_path / "med_config.json").write_text(json.dumps(assets.med))
    torch.save({**assets.sd, key: torch.zeros(1)}, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardLoadError, match="unexpected key") as info:
        build_reward("imagereward", model=str(tmp_path), tokenizer=assets.tokenizer_dir)
    assert "\n" not in str(info.value)


def test_missing_or_misshapen_weight_fails_loudly(assets, tmp_path):
    (tmp_path / "med_config.json").write_text(json.dumps(assets.med))
    key = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
    torch.save({k: v for k, v in assets.sd.items() if k != key}, tmp_path / "ImageReward.pt")
    with pytest.raises(
        RewardLoadError, match="does not fit ImageReward's text encoder.*crossattention.self.key"
    ):
        build_reward("imagereward", model=str(tmp_path), tokenizer=assets.tokenizer_dir)
    torch.save({**assets.sd, key: torch.zeros(3, 3)}, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardLoadError, match="size mismatch"):
        build_reward("imagereward", model=str(tmp_path), tokenizer=assets.tokenizer_dir)


# ---------------------------------------------------------------- tokens and preprocessing


def test_tokens_start_with_cls_and_are_cached_per_prompt(assets):
    reward = build_reward("imagereward", model=assets.model, cache_size=8)
    encoded = []
    original = reward._encode_text
    reward._encode_text = lambda prompts: (encoded.append(list(prompts)), original(prompts))[1]
    calls = []
    reward.text.encoder.layer[0].register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    prompts = ["a cat", "a red circle", "a cat"]
    images, _ = make_images(224, 224, n=3)
    first = reward(images, prompts)
    second = reward(images, prompts)
    assert encoded == [["a cat", "a red circle"]]  # token ids once per prompt ...
    assert calls == [3, 3]  # ... the text tower once per image-prompt pair, every call
    torch.testing.assert_close(first, second)
    ids = reward.text_features(prompts)
    assert ids.shape == (3, 2, 35)
    assert (ids[:, 0, 0] == 101).all()  # [CLS] of bert-base-uncased, not [ENC]
    assert ids[0, 0, :4].tolist() == [101, *assets.tokenizer.convert_tokens_to_ids(["a", "cat"]), 102]
    torch.testing.assert_close(ids[:, 1], (ids[:, 0] != 0).long())  # attention mask = not padding
    assert len(reward.tokenizer) == reward.text.config.vocab_size  # [DEC], [ENC] added
    reward.to("cpu")  # moving the reward drops what was cached on the old device
    assert len(reward.text_cache) == 0


@pytest.mark.parametrize(
    ("height", "width"), [(224, 224), (224, 227), (256, 301), (300, 200), (123, 457), (64, 96)]
)
def test_preprocessing_matches_torchvision(height, width):
    images, pils = make_images(height, width, n=2, seed=height * width)
    ref = official_pixels(pils)
    got = preprocess_images(images, ir.preprocess_config())
    assert got.shape == ref.shape == (2, 3, 224, 224)
    diff = (got - ref).abs()
    if min(height, width) == 224:  # no resize: only the crop, with torchvision's rounded offset
        assert diff.max() < 1e-5
    else:
        assert diff.max() <= PIXEL_MAX and diff.mean() <= PIXEL_MEAN


def test_refuses_pixels_of_another_size(reward):
    with pytest.raises(ValueError, match="224x224"):
        reward.score_pixels(torch.zeros(1, 3, 192, 192), ["x"])


# ---------------------------------------------------------------- gradients, memory options


def test_gradients_reach_images_not_weights(reward):
    assert not reward.training and all(not p.requires_grad for p in reward.parameters())
    images = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    reward(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert (images.grad.abs().sum(dim=(1, 2, 3)) > 0).all()
    assert all(p.grad is None for p in reward.parameters())


def test_gradient_checkpointing_same_values_and_grads_both_towers(assets, reward):
    ckpt = build_reward("imagereward", model=assets.model, gradient_checkpointing=True)
    calls = {"vision": 0, "text": 0}
    # Hooks on early submodules: the recomputation stops once it has what backward needs.
    ckpt.vision.encoder.layers[0].self_attn.register_forward_hook(
        lambda *a: calls.__setitem__("vision", calls["vision"] + 1)
    )
    ckpt.text.encoder.layer[0].attention.register_forward_hook(
        lambda *a: calls.__setitem__("text", calls["text"] + 1)
    )
    results = []
    for r in (reward, ckpt):
        images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        score = r(images, PROMPTS[:2])
        score.sum().backward()
        results.append((score.detach(), images.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert calls == {"vision": 2, "text": 2}  # forward + recomputation in backward, in both towers


def test_bf16_towers_fp32_head_and_scores(assets, reward):
    bf16 = build_reward("imagereward", model=assets.model, dtype="bf16")
    assert next(bf16.vision.parameters()).dtype == torch.bfloat16
    assert next(bf16.text.parameters()).dtype == torch.bfloat16
    assert next(bf16.head.parameters()).dtype == torch.float32  # as ImageReward's `.float()` before the MLP
    images, _ = make_images(224, 224, n=2, seed=9)
    out = bf16(images, PROMPTS[:2])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reward(images, PROMPTS[:2]), atol=0.2, rtol=0)


# ---------------------------------------------------------------- loading: local dirs, hub, errors


def test_options_are_checked_without_loading():
    # imagereward takes model/tokenizer (and the memory options), nothing else -- checked from its
    # signature, before anything is loaded.
    validate_reward_spec("imagereward=1,pickscore=0.5", **{"imagereward.tokenizer": "/x", "cache_size": 0})
    with pytest.raises(RewardSpecError, match="'imagereward' takes no option 'processor'"):
        validate_reward_spec("imagereward", **{"imagereward.processor": "/x"})


def test_tokenizer_falls_back_to_model_dir_else_bert_base_uncased(assets):
    # model dir with vocab.txt: no tokenizer= needed (offline: bert-base-uncased is not reachable).
    assert len(build_reward("imagereward", model=assets.model).tokenizer) == len(assets.tokenizer)
    # no tokenizer files there: the official bert-base-uncased, which offline is one clear line ...
    # (transformers 5 does not fail there: it builds a 5-token vocabulary, which the port refuses.)
    with pytest.raises(RewardLoadError, match="tokenizer from 'bert-base-uncased' has 7 tokens") as info:
        build_reward("imagereward", model=assets.weights_only)
    assert "\n" not in str(info.value) and "pass tokenizer=/local/dir" in str(info.value)
    # ... unless tokenizer= points at a local copy.
    reward = build_reward("imagereward", model=assets.weights_only, tokenizer=assets.tokenizer_dir)
    assert reward.tokenizer.cls_token_id == 101


def test_unreachable_hub_model_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(RewardLoadError) as info:
        build_reward("imagereward")  # THUDM/ImageReward, under HF_HUB_OFFLINE=1 (conftest)
    message = str(info.value)
    assert "\n" not in message
    assert "ImageReward.pt" in message and "'THUDM/ImageReward'" in message
    assert "model=/local/dir holding ImageReward.pt, med_config.json" in message


def test_local_dir_missing_files_is_one_line(assets, tmp_path):
    torch.save(assets.sd, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardLoadError, match=r"has no med_config.json") as info:
        build_reward("imagereward", model=str(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(RewardLoadError, match="directory not found"):
        build_reward("imagereward", model=str(tmp_path / "nope"))


def test_checkpoint_is_never_unpickled(assets, tmp_path):
    (tmp_path / "med_config.json").write_text(json.dumps(assets.med))
    torch.save({**assets.sd, "extra": SimpleNamespace(a=1)}, tmp_path / "ImageReward.pt")
    with pytest.raises(RewardLoadError, match="weights_only=True"):
        build_reward("imagereward", model=str(tmp_path), tokenizer=assets.tokenizer_dir)
