"""HPSv3 parity: `rewards.hpsv3` (transformers 5) against HPSv3's own code (transformers 4.45.2), same weights.

HPSv3's package pins transformers 4.45.2, so its side runs in a separate virtual environment:

    python -m venv /tmp/hpsv3-orig
    /tmp/hpsv3-orig/bin/pip install torch==2.14.1 transformers==4.45.2 tokenizers==0.20.3 \\
        huggingface-hub==0.32.4 accelerate==1.8.0 torchvision==0.29.1 safetensors pillow pandas omegaconf
    python benchmarks/hpsv3_parity.py --checkout /path/to/HPSv3 --python /tmp/hpsv3-orig/bin/python

`--checkout` is a checkout of HPSv3's code (MizzenAI/HPSv3 at its last code commit, e.g. the fork
louisdarbandi/HPSv3); nothing of it is copied here. The original side (`original` sub-command, run by
`--python`) uses, from the checkout: `Qwen2VLRewardModelBT` (the class, taken out of
`hpsv3/model/qwen2vl_trainer.py` by its source, since that module imports the whole training
stack: trl, deepspeed, tensorboard), and `HPSv3RewardInferencer.prepare_batch` / `.reward` with
`process_vision_info`, `INSTRUCTION` and the differentiable image processor, imported as they are
(only `hpsv3.train`, which the inferencer imports for its constructor, is stubbed; the constructor's
steps -- `create_model_and_processor` -- are reproduced below: processor with right padding,
`<|Reward|>` added, rm_head "ranknet" in fp32, embeddings resized to the tokenizer, pad id).

The model has Qwen2-VL-7B-Instruct's real widths (decoder 3584, 28 heads / 4 KV heads, MLP 18944;
vision 1280, 16 heads; merger to 3584) with reduced depth (`--llm-layers`, `--vision-layers`) and a
small byte-level BPE tokenizer trained here on HPSv3's instruction (so the vocabulary is small), both
for CPU memory and time; weights are random (transformers' init, norms and biases perturbed so that
no ones/zeros hide a wrong eps or a dropped bias). Both sides read the same files: the original's
own `state_dict()` saved as HPSv3.safetensors, a base directory with config.json, tokenizer,
preprocessor config and the Qwen2-VL-7B-Instruct chat template.

Measured: (1) images already at the official size (448x448, no resize): mu of both, relative
difference, and identical token ids and pixel values; (2) resized images: our gap to the original's
PIL path, next to the original's own tensor ("differentiable") path's gap to its PIL path; (3) the
gradient of mu with respect to the pixels: autograd against central finite differences along a random
direction, and against the original's tensor path at the official size (where neither resizes).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

PROMPTS = [
    "a red fox sitting in the snow, watercolor",
    "cute chibi anime cartoon fox, smiling wagging tail with a small cartoon heart above sticker",
]
#: (height, width) of each case's images: the official size, then two that HPSv3 resizes.
SIZES = {"official_448x448": (448, 448), "resized_512x512": (512, 512), "resized_768x512": (768, 512)}
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Qwen/Qwen2-VL-7B-Instruct's chat_template.json (data the original processor renders; not HPSv3 code).
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


def make_images(height: int, width: int, n: int, seed: int) -> np.ndarray:
    """Smooth random uint8 images `[n, H, W, 3]` (low-frequency colour + fine noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 6, 6, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    x = x + 0.08 * torch.randn(n, 3, height, width, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- the original side (transformers 4.45)


def _original_model_class(checkout: Path) -> type:
    """`Qwen2VLRewardModelBT` from the checkout's source, without importing its training stack."""
    source = (checkout / "hpsv3" / "model" / "qwen2vl_trainer.py").read_text()
    tree = ast.parse(source)
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLRewardModelBT"]
    from typing import Optional

    import torch.nn as nn
    from transformers import Qwen2VLForConditionalGeneration

    namespace = {
        "torch": torch, "nn": nn, "Optional": Optional, "List": typing.List,  # noqa: UP006 - the original's annotations
        "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    }  # fmt: skip
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(checkout / "hpsv3/model/qwen2vl_trainer.py"), "exec"), namespace)  # noqa: S102
    return namespace["Qwen2VLRewardModelBT"]


def _import_original(checkout: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """(hpsv3.inference, hpsv3.model.differentiable_image_processor) from the checkout."""
    package = types.ModuleType("hpsv3")
    package.__path__ = [str(checkout / "hpsv3")]
    sys.modules["hpsv3"] = package
    stub = types.ModuleType("hpsv3.train")  # the inferencer's constructor only; reproduced in `original`
    stub.create_model_and_processor = None
    sys.modules["hpsv3.train"] = stub
    return importlib.import_module("hpsv3.inference"), importlib.import_module(
        "hpsv3.model.differentiable_image_processor"
    )


# Qwen2's pre-tokenizer split (its tokenizer.json; transformers 5's Qwen2Tokenizer imposes it whatever the
# file says, so the test tokenizer must have it for both sides to tokenise alike, as the real one does).
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _train_tokenizer(instruction: str, suffix: str) -> object:
    """A byte-level BPE with Qwen2's normaliser, pre-tokenizer and special tokens, trained on HPSv3's text."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([instruction, suffix, *PROMPTS], trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tok, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def original(args: argparse.Namespace) -> None:
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor

    torch.manual_seed(0)
    checkout, work = Path(args.checkout), Path(args.work)
    inference, diff_proc = _import_original(checkout)
    collator = importlib.import_module("hpsv3.dataset.data_collator_qwen")
    base, weights = work / "base", work / "hpsv3"
    base.mkdir(parents=True, exist_ok=True)
    weights.mkdir(parents=True, exist_ok=True)

    # The base "Qwen2-VL-7B-Instruct": tokenizer, processor (the published pixel range), chat template, config.
    tokenizer = _train_tokenizer(collator.INSTRUCTION, collator.prompt_with_special_token)
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(str(base))
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    config = Qwen2VLConfig(
        vocab_size=len(tokenizer) + 7,  # larger than the tokenizer, as 152064 > 151657: resized below
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=args.llm_layers,
        num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        use_sliding_window=False, sliding_window=32768, max_window_layers=28, tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_config={"depth": args.vision_layers, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                       "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    config.save_pretrained(str(base))

    # create_model_and_processor(HPSv3_7B.yaml), step by step.
    processor = AutoProcessor.from_pretrained(str(base), padding_side="right")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    special_token_ids = processor.tokenizer.convert_tokens_to_ids(["<|Reward|>"])
    model_cls = _original_model_class(checkout)
    model = model_cls(
        config, output_dim=2, reward_token="special", special_token_ids=special_token_ids,
        rm_head_type="ranknet", rm_head_kwargs=None,
    )  # fmt: skip
    model.resize_token_embeddings(len(processor.tokenizer))
    model.rm_head.to(torch.float32)
    model.config.pad_token_id = processor.tokenizer.pad_token_id
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights / "HPSv3.safetensors"))

    inferencer = object.__new__(inference.HPSv3RewardInferencer)
    inferencer.model, inferencer.processor, inferencer.device = model, processor, "cpu"
    inferencer.use_special_tokens = True
    differentiable = object.__new__(inference.HPSv3RewardInferencer)
    differentiable.__dict__.update(inferencer.__dict__)
    differentiable.processor = AutoProcessor.from_pretrained(str(base), padding_side="right")
    differentiable.processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    differentiable.processor.image_processor = diff_proc.Qwen2VLImageProcessor()  # differentiable=True

    out: dict[str, object] = {"transformers": __import__("transformers").__version__, "torch": torch.__version__}
    tensors: dict[str, torch.Tensor] = {}
    for seed, (case, (h, w)) in enumerate(SIZES.items()):
        images = make_images(h, w, len(PROMPTS), seed)
        np.save(work / f"{case}.npy", images)
        t0 = time.time()
        pil = [Image.fromarray(a) for a in images]
        batch = inferencer.prepare_batch(pil, PROMPTS)
        with torch.no_grad():
            logits = model(return_dict=True, **batch)["logits"]
        tensors[f"{case}.pil.logits"] = logits.float()
        tensors[f"{case}.pil.input_ids"] = batch["input_ids"]
        tensors[f"{case}.pil.attention_mask"] = batch["attention_mask"]
        tensors[f"{case}.pil.pixel_values"] = batch["pixel_values"].float()
        tensors[f"{case}.pil.image_grid_thw"] = batch["image_grid_thw"]
        # The original's differentiable path: float CHW tensors in [0, 255] (its processor rescales by 1/255).
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().requires_grad_(True)
        batch = differentiable.prepare_batch(list(x), PROMPTS)
        logits_t = model(return_dict=True, **batch)["logits"]
        logits_t[:, 0].sum().backward()
        tensors[f"{case}.tensor.logits"] = logits_t.detach().float()
        tensors[f"{case}.tensor.grad_per_unit"] = x.grad * 255.0  # d mu / d (pixel in [0, 1])
        out[case] = {"seconds": time.time() - t0}
        print(f"original {case}: {time.time() - t0:.1f}s", flush=True)
    torch.save(tensors, work / "original.pt")
    (work / "original.json").write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------- our side (transformers 5)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def ours(work: Path, args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    import transformers

    from rewards.hpsv3 import HPSv3Reward

    ref = torch.load(work / "original.pt", weights_only=True)
    original_meta = json.loads((work / "original.json").read_text())
    reward = HPSv3Reward(model=str(work / "hpsv3"), base=str(work / "base"))
    result: dict = {
        "setup": {
            "ours": {"transformers": transformers.__version__, "torch": torch.__version__},
            "original": {k: original_meta[k] for k in ("transformers", "torch")},
            "architecture": "Qwen2-VL-7B-Instruct widths (decoder 3584, 28 heads / 4 KV, MLP 18944; vision 1280, "
            f"16 heads; merger -> 3584), reduced depth: {args.llm_layers} decoder layers, {args.vision_layers} vision "
            f"blocks; vocabulary {len(reward.tokenizer)} (a BPE trained on HPSv3's instruction); random weights",
            "parameters": sum(p.numel() for p in reward.parameters()),
            "dtype": "fp32 on CPU, SDPA attention on both sides",
            "prompts": PROMPTS,
        },
        "cases": {},
    }
    from rewards.qwen2vl_preprocess import qwen2vl_pixels

    for case in SIZES:  # the token ids first: a mismatch makes every score comparison moot
        h, w = SIZES[case]
        n_tokens = reward.preprocess_config.tokens_per_image(h, w)
        input_ids, attention_mask = reward.token_batch(PROMPTS, n_tokens)
        if not torch.equal(input_ids, ref[f"{case}.pil.input_ids"]):
            raise SystemExit(f"{case}: token ids differ from the original's; fix the tokenizer/template first")
    for case in SIZES:
        images = np.load(work / f"{case}.npy")
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).requires_grad_(True)
        pixel_values, grid = qwen2vl_pixels(x.detach(), reward.preprocess_config)
        input_ids, attention_mask = reward.token_batch(PROMPTS, int(grid[0].prod()) // 4)
        mu_sigma = reward.score_pixels(*qwen2vl_pixels(x, reward.preprocess_config), PROMPTS)
        mu = mu_sigma[:, 0]
        mu.sum().backward()
        pil, tensor = ref[f"{case}.pil.logits"], ref[f"{case}.tensor.logits"]
        entry = {
            "image_size": list(images.shape[1:3]),
            "resized_to": [int(grid[0, 1]) * 14, int(grid[0, 2]) * 14],
            "mu_ours": mu.tolist(),
            "mu_original_pil": pil[:, 0].tolist(),
            "mu_original_tensor": tensor[:, 0].tolist(),
            "sigma_ours": mu_sigma[:, 1].tolist(),
            "sigma_original_pil": pil[:, 1].tolist(),
            "rel_diff_ours_vs_original_pil": [_rel(a, b) for a, b in zip(mu.tolist(), pil[:, 0].tolist())],
            "rel_diff_original_tensor_vs_original_pil": [
                _rel(a, b) for a, b in zip(tensor[:, 0].tolist(), pil[:, 0].tolist())
            ],
            "abs_diff_ours_vs_original_pil": (mu.detach() - pil[:, 0]).abs().tolist(),
            "abs_diff_original_tensor_vs_original_pil": (tensor[:, 0] - pil[:, 0]).abs().tolist(),
            "mu_spread_between_images_original_pil": float((pil[0, 0] - pil[1, 0]).abs()),
            "token_ids_equal": bool(torch.equal(input_ids, ref[f"{case}.pil.input_ids"])),
            "attention_mask_equal": bool(torch.equal(attention_mask, ref[f"{case}.pil.attention_mask"])),
            "image_grid_thw_equal": bool(torch.equal(grid, ref[f"{case}.pil.image_grid_thw"])),
            "pixel_values_max_abs_diff_vs_pil": float((pixel_values - ref[f"{case}.pil.pixel_values"]).abs().max()),
            "sequence_length": int(input_ids.shape[1]),
        }
        grad_ref = ref[f"{case}.tensor.grad_per_unit"]
        cos = torch.nn.functional.cosine_similarity(x.grad.flatten(), grad_ref.flatten(), dim=0)
        entry["grad_cosine_vs_original_tensor_path"] = float(cos)
        entry["grad_rel_l2_vs_original_tensor_path"] = float((x.grad - grad_ref).norm() / grad_ref.norm())
        if case.startswith("official"):
            entry["finite_differences"] = finite_differences(reward, x.detach()[:1], PROMPTS[:1])
        result["cases"][case] = entry
        print(case, json.dumps({k: v for k, v in entry.items() if "diff" in k or "equal" in k}), flush=True)
    return result


def finite_differences(reward, x: torch.Tensor, prompts: list[str]) -> dict:
    """d mu / d pixels along a random direction: autograd vs central differences at a few steps."""
    # Unit variance per pixel: a step of eps moves every pixel by ~eps, well above fp32 rounding.
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    xg = x.clone().requires_grad_(True)
    reward(xg, prompts).sum().backward()
    analytic = float((xg.grad * direction).sum())
    rows = []
    with torch.no_grad():
        for eps in (1e-3, 3e-4):
            up = float(reward(x + eps * direction, prompts)[0])
            down = float(reward(x - eps * direction, prompts)[0])
            numeric = (up - down) / (2 * eps)
            rows.append({"eps": eps, "numeric": numeric, "rel_err": _rel(analytic, numeric)})
    return {"analytic": analytic, "steps": rows, "best_rel_err": min(r["rel_err"] for r in rows)}


def write_report(result: dict, path_md: Path, path_json: Path) -> None:
    path_json.write_text(json.dumps(result, indent=1) + "\n")
    s = result["setup"]
    lines = [
        "# HPSv3 parity: rewards.hpsv3 (transformers 5) vs HPSv3's code (transformers 4.45.2)",
        "",
        f"Made by `benchmarks/hpsv3_parity.py`. Ours: transformers {s['ours']['transformers']}, torch "
        f"{s['ours']['torch']}; original: transformers {s['original']['transformers']}, torch "
        f"{s['original']['torch']} (separate venv). {s['architecture']}; {s['parameters'] / 1e6:.0f}M parameters; "
        f"{s['dtype']}. Score = mu of the head's (mu, sigma), two prompts of different lengths per batch "
        "(right padding exercised).",
        "",
        "| case | resized to | mu original (PIL path) | mu ours | rel. diff ours | rel. diff original tensor path "
        "| tokens / grid / pixels | grad vs original tensor path (cos, rel. L2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, e in result["cases"].items():
        lines.append(
            f"| {case} | {e['resized_to'][0]}x{e['resized_to'][1]} | "
            + ", ".join(f"{v:.6f}" for v in e["mu_original_pil"])
            + " | "
            + ", ".join(f"{v:.6f}" for v in e["mu_ours"])
            + " | "
            + ", ".join(f"{v:.1e}" for v in e["rel_diff_ours_vs_original_pil"])
            + " | "
            + ", ".join(f"{v:.1e}" for v in e["rel_diff_original_tensor_vs_original_pil"])
            + f" | {'equal' if e['token_ids_equal'] and e['attention_mask_equal'] else 'DIFFERENT'} / "
            f"{'equal' if e['image_grid_thw_equal'] else 'DIFFERENT'} / max {e['pixel_values_max_abs_diff_vs_pil']:.1e}"
            f" | {e['grad_cosine_vs_original_tensor_path']:.6f}, {e['grad_rel_l2_vs_original_tensor_path']:.1e} |"
        )
    fd = result["cases"]["official_448x448"]["finite_differences"]
    lines += [
        "",
        "Pixel differences are in normalised units (the PIL path rounds to uint8 after resizing; ours does not). "
        "The original's tensor path is its differentiable processor (`hpsv3/model/differentiable_image_processor.py`, "
        "via `fetch_image`'s torchvision resize) on float tensors; at the official size neither path resizes, so "
        "its gradient is a reference for ours there. Resized cases: compare the two gap columns.",
        "",
        f"Gradient of mu w.r.t. the pixels (official size, image 0, along a random direction of unit variance per pixel): autograd "
        f"{fd['analytic']:.6e}; central differences "
        + ", ".join(f"eps={r['eps']:g}: {r['numeric']:.6e} (rel. err {r['rel_err']:.1e})" for r in fd["steps"])
        + ".",
        "",
    ]
    path_md.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    orig = sub.add_parser("original", help="the original side (run by the transformers 4.45 venv's python)")
    for p in (parser, orig):
        p.add_argument("--checkout", required=p is orig, help="checkout of HPSv3's code (MizzenAI/HPSv3 or a fork)")
        p.add_argument("--work", default="/tmp/hpsv3_parity", help="working directory for the shared files")
        p.add_argument("--llm-layers", type=int, default=1)
        p.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--python", help="python of the venv with HPSv3's pins (transformers 4.45.2)")
    parser.add_argument("--skip-original", action="store_true", help="reuse --work's original outputs")
    args = parser.parse_args()
    if args.command == "original":
        original(args)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work)
    if not args.skip_original:
        if not (args.checkout and args.python):
            parser.error("--checkout and --python are required (or --skip-original)")
        command = [args.python, __file__, "original", "--checkout", args.checkout, "--work", str(work)]
        command += ["--llm-layers", str(args.llm_layers), "--vision-layers", str(args.vision_layers)]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": ""})
    result = ours(work, args)
    RESULTS.mkdir(exist_ok=True)
    write_report(result, RESULTS / "hpsv3_parity.md", RESULTS / "hpsv3_parity.json")
    print((RESULTS / "hpsv3_parity.md").read_text())


if __name__ == "__main__":
    main()
