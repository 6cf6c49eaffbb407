"""LoRA on the flow-matching transformers (SD3/SD3.5, FLUX.1): the presets on the real configs, the diffusers
file and its scale in the family's pipeline, loading it back to resume, and the 4-bit base (QLoRA) at load time."""

import copy
import json

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from lora_fixtures import randomise_lora_B
from safetensors import safe_open

from utils.families import Flux, StableDiffusion3, load_family
from utils.families.qwen_image import QwenImage
from utils.lora import LORA_WEIGHTS_NAME, add_lora, load_lora_into_denoiser, lora_state_dict, save_lora
from utils.run.guards import lora_digest

# The transformer configs of black-forest-labs/FLUX.1-dev and stabilityai/stable-diffusion-3.5-medium.
FLUX_1_DEV = {"attention_head_dim": 128, "axes_dims_rope": [16, 56, 56], "guidance_embeds": True, "in_channels": 64,
              "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19, "num_single_layers": 38,
              "patch_size": 1, "pooled_projection_dim": 768}
SD35_MEDIUM = {"attention_head_dim": 64, "caption_projection_dim": 1536, "dual_attention_layers": list(range(13)),
               "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
               "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
               "qk_norm": "rms_norm", "sample_size": 128}
SEQ = 16


@pytest.mark.parametrize("family,model_class,config,attention,attention_ff,diffusers", [
    (Flux, FluxTransformer2DModel, FLUX_1_DEV, 19 * 8 + 38 * 3, 19 * 8 + 38 * 3 + 19 * 4 + 38 * 2, 342),
    (StableDiffusion3, SD3Transformer2DModel, SD35_MEDIUM, 24 * 7 + 23 + 13 * 4, 24 * 7 + 23 + 13 * 4 + 24 * 2 + 23 * 2,
     191),
])
def test_presets_on_the_real_configs(family, model_class, config, attention, attention_ff, diffusers):
    """FLUX.1-dev: 19 double blocks x 8 attention projections + 38 single blocks x (q, k, v); +ff: both streams'
    MLPs and the single blocks' proj_mlp / proj_out, never the final proj_out. SD3.5-Medium: 24 blocks x 7,
    to_add_out on 23 (the last is context-pre-only), attn2 on the 13 dual-attention blocks; +ff: both MLPs
    (no ff_context on the last block). `diffusers`: what diffusers' DreamBooth LoRA scripts adapt by default, 342
    on FLUX.1-dev (19 x 12 + 38 x 3) and 191 on SD3.5-Medium (`attn.` names: attn2 left alone)."""
    counts = []
    for preset in ("attention", "attention+ff", "diffusers"):
        with torch.device("meta"):
            transformer = model_class.from_config(config)
            add_lora(transformer, rank=4, target_modules=family.target_modules([preset], config))
        names = {n.removesuffix(".lora_A") for n, _ in transformer.named_modules() if n.endswith(".lora_A")}
        assert "proj_out" not in names and "norm_out.linear" not in names  # the output layers stay the model's
        counts.append(len(names))
    assert counts == [attention, attention_ff, diffusers]


def test_flux_attention_ff_needs_the_transformer_config():
    with pytest.raises(ValueError, match="num_single_layers"):
        Flux.target_modules(["attention+ff"], None)
    assert Flux.target_modules(["attention"], None) == StableDiffusion3.target_modules(["attention"])


def lora_family(path, alpha, seed=1):
    family = load_family(str(path), max_sequence_length=SEQ)
    for module in (family.vae, family.denoiser, *family.text_encoders):
        module.requires_grad_(False).eval()
    add_lora(family.denoiser, rank=4, lora_alpha=alpha,
             target_modules=family.target_modules(["attention+ff"], family.denoiser.config))
    randomise_lora_B(family.denoiser, std=0.1, seed=seed)
    return family


def velocity(family, pipe=None, seed=0):
    """The guided velocity of the family's denoiser (or of `pipe`'s) on a fixed latent, at the second timestep."""
    denoiser = (pipe or family.pipe).transformer
    noise = torch.randn(1, family.latent_channels, 8, 12, generator=torch.Generator().manual_seed(seed))
    cond = family.encode_prompts(["a red circle"], "", True)
    scheduler = copy.deepcopy(family.pipe.scheduler)
    family.set_timesteps(scheduler, 4, (8, 12))
    with torch.no_grad():
        return family.predict(denoiser, noise, scheduler.timesteps[1], cond, 3.5)


@pytest.mark.parametrize("fixture", ["tiny_flux_dev_path", "tiny_sd3_path", "tiny_qwen_image_path"])
def test_saved_lora_loads_in_the_pipeline_at_its_alpha_and_resumes(fixture, request, tmp_path):
    """The file: PEFT's keys under `transformer.` (no old-style key conversion), the LoraConfig as metadata;
    `pipe.load_lora_weights` gives the trained velocity (alpha 8 != rank 4), and so does loading it back
    into a fresh adapter, as a resume does."""
    path = request.getfixturevalue(fixture)
    trained = lora_family(path, alpha=8.0)
    file = save_lora(trained.denoiser, tmp_path, trained)
    assert file == tmp_path / LORA_WEIGHTS_NAME
    with safe_open(str(file), framework="pt") as f:
        keys, metadata = list(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert not any(".lora.down." in k or ".lora.up." in k for k in keys)
    assert (metadata["transformer.lora_alpha"], metadata["transformer.r"]) == (8.0, 4)
    assert metadata["transformer.lora_dropout"] == 0.0
    with safe_open(str(file), framework="pt") as f:  # the digest of the file is the digest of the LoRA in memory
        assert lora_digest({k: f.get_tensor(k) for k in f.keys()}) == lora_digest(lora_state_dict(trained.denoiser,
                                                                                                   trained))

    pipe = type(trained.pipe).from_pretrained(path)
    base = velocity(trained, pipe)
    pipe.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHTS_NAME)
    config = next(iter(pipe.transformer.peft_config.values()))
    assert (config.r, config.lora_alpha) == (4, 8.0)
    expected = velocity(trained)
    torch.testing.assert_close(velocity(trained, pipe), expected, rtol=1e-5, atol=1e-6)
    assert (expected - base).abs().max() > 1e-2

    resumed = lora_family(path, alpha=8.0, seed=2)  # another random adapter of the same shape
    assert not torch.allclose(velocity(resumed), expected)
    load_lora_into_denoiser(resumed.denoiser, tmp_path, resumed)
    torch.testing.assert_close(velocity(resumed), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", [Flux, StableDiffusion3, QwenImage])
def test_quantize_base_loads_the_denoiser_in_nf4_computing_in_the_weight_dtype(family, monkeypatch):
    """QLoRA as diffusers' FLUX example: BitsAndBytesConfig(load_in_4bit, nf4, compute dtype = weight dtype) for
    the transformer alone, given to from_pretrained (which needs CUDA to apply it; here it is only recorded)."""
    seen = {}

    def from_pretrained(*args, **kwargs):
        seen.update(kwargs)
        raise OSError("recorded")

    monkeypatch.setattr(family.pipeline_class(), "from_pretrained", from_pretrained)
    with pytest.raises(OSError, match="recorded"):
        family.load("some/model", dtype=torch.bfloat16, quantize_base="nf4")
    config = seen["quantization_config"]
    assert list(config.quant_mapping) == ["transformer"]
    nf4 = config.quant_mapping["transformer"]
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_compute_dtype == torch.bfloat16
    assert seen["dtype"] == {"default": torch.bfloat16, "vae": torch.bfloat16}


def test_qlora_pieces_on_cpu_a_4bit_base_under_fp32_lora_with_gradients(tiny_flux_dev_path):
    """What `--quantize_base nf4` builds, where a CPU can: diffusers' quantizer needs CUDA, but bitsandbytes' 4-bit
    layers run on CPU. The tiny FLUX transformer (bf16, as under --mixed_precision bf16) gets the NF4 layers
    diffusers' quantizer makes (`benchmarks.flow_memory.quantize_nf4`); `add_lora` wraps them with PEFT's 4-bit
    LoRA layers, keeps the LoRA weights in fp32 (PEFT would make them bf16, the compute dtype) and trainable, and
    with the adapters off the model is exactly the quantized base: the DRaFT+ reference under QLoRA."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from benchmarks.flow_memory import cpu_4bit_layers_in_training_mode, quantize_nf4
    from utils.lora import adapters_disabled

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dev_path, subfolder="transformer",
                                                         dtype=torch.bfloat16).eval()
    linear = sum(isinstance(m, torch.nn.Linear) for m in transformer.modules())
    generator = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 12, 64, generator=generator), "timestep": torch.tensor([0.5]),
              "guidance": torch.tensor([3.5]), "pooled_projections": torch.randn(1, 32, generator=generator),
              "encoder_hidden_states": torch.randn(1, 7, 32, generator=generator), "txt_ids": torch.zeros(7, 3),
              "img_ids": torch.zeros(12, 3), "return_dict": False}
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and k != "timestep" else v for k, v in inputs.items()}
    with torch.no_grad():
        full_precision = transformer(**inputs)[0]

    assert quantize_nf4(transformer, torch.bfloat16) == linear  # every Linear layer, as the quantizer does
    assert not any(type(m) is torch.nn.Linear for m in transformer.modules())
    assert transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.uint8  # packed 4-bit
    cpu_4bit_layers_in_training_mode(transformer)  # see its docstring: a bitsandbytes CPU-kernel matter
    with torch.no_grad():
        quantized_base = transformer(**inputs)[0]
    assert (quantized_base - full_precision).abs().max() > 1e-3  # 4-bit rounding: another base model

    params = add_lora(transformer, rank=4, lora_alpha=8, target_modules=Flux.target_modules(["attention"]))
    wrapped = [m for m in transformer.modules() if isinstance(m, LoraLinear4bit)]
    assert wrapped and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in wrapped)
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert {id(p) for p in transformer.parameters() if p.requires_grad} == {id(p) for p in params}
    randomise_lora_B(transformer, std=0.1, seed=None)

    with torch.no_grad(), adapters_disabled(transformer):
        torch.testing.assert_close(transformer(**inputs)[0], quantized_base, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = transformer(**inputs)[0]
    assert (out - quantized_base).abs().max() > 1e-3  # the LoRA acts on top of the 4-bit base
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in params]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
