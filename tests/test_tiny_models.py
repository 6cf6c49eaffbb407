"""utils/toys/tiny_models.py: the generated tokenizer, the shared component configs and the random tiny pipelines."""

import os

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from utils.toys.tiny_models import (
    build_clip_tokenizer,
    build_random_flux_pipeline,
    build_random_pipeline,
    build_random_sd3_pipeline,
    build_random_sdxl_pipeline,
    build_t5_tokenizer,
    clip_text_config,
)


def test_tokenizer_knows_words_and_falls_back_to_characters(tmp_path):
    tok = build_clip_tokenizer(tmp_path)
    ids = tok("a red circle").input_ids
    assert len(ids) == 5 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(tok("xqz").input_ids) == 2 + 3  # unknown word: one token per character
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a red circle"
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded("a blue square on a red background").input_ids == tok("a blue square on a red background").input_ids
    assert len(build_clip_tokenizer(words=("a", "b"))("a b").input_ids) == 4  # no merges at all still works


def test_clip_text_config_fits_its_tokenizer():
    tok = build_clip_tokenizer(words=("a", "red", "circle"), model_max_length=12)
    config = clip_text_config(tok, hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2)
    assert (config.vocab_size, config.max_position_embeddings) == (len(tok), 12)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    ids = tok(["a red circle", "xyz"], padding="max_length", return_tensors="pt").input_ids
    pooled = CLIPTextModel(config)(ids).pooler_output  # pooled at the eos token: the ids must agree
    assert pooled.shape == (2, 16)


def test_random_pipeline_loads_and_generates(tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)

    def sample(seed):
        return pipe(["a red circle", "a cat"], num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
                    output_type="pt").images

    a, b, c = sample(0), sample(0), sample(1)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    assert build_random_pipeline(seed=3).unet.config.sample_size == 16


def test_random_sdxl_pipeline_has_two_encoders_of_one_config():
    pipe = build_random_sdxl_pipeline(seed=0)
    one, two = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert one.hidden_size == two.hidden_size == two.projection_dim == 32 and one.num_hidden_layers == 3
    assert pipe.unet.config.cross_attention_dim == one.hidden_size + two.hidden_size


def test_t5_tokenizer_is_built_offline_and_round_trips(tmp_path):
    tok = build_t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # T5's layout
    ids = tok("a red circle").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁red", "▁circle", "</s>"]  # known words: one token each
    assert tok.unk_token_id not in tok("zebra-like 42 things!").input_ids  # any ASCII text tokenizes
    assert tok.unk_token_id in tok("é").input_ids
    assert tok(["a red circle"], padding="max_length", max_length=8).input_ids[0] == ids + [0] * 4
    tok.save_pretrained(tmp_path)
    assert not (tmp_path / "spiece.model").exists()  # no sentencepiece model needed
    reloaded = type(tok).from_pretrained(tmp_path)
    assert reloaded("a red circle, zebra!").input_ids == tok("a red circle, zebra!").input_ids


FLOW_BUILDERS = {
    "flux-dev": (FluxPipeline, lambda path=None: build_random_flux_pipeline(path, guidance_embeds=True)),
    "flux-schnell": (FluxPipeline, lambda path=None: build_random_flux_pipeline(path, guidance_embeds=False)),
    "sd3": (StableDiffusion3Pipeline, build_random_sd3_pipeline),
}


def _render(pipe, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipe(["a red circle", "a blue square"], height=48, width=32, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(0), max_sequence_length=16, output_type="pt",
                    **kwargs).images


@pytest.mark.parametrize("name", list(FLOW_BUILDERS))
def test_flow_pipeline_survives_save_and_offline_load_and_renders(name, tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    pipeline_class, build = FLOW_BUILDERS[name]
    in_memory = build(tmp_path)
    pipe = pipeline_class.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) < 5 * 2**20
    images = _render(pipe)
    assert images.shape == (2, 3, 48, 32) and images.std() > 0.01  # non-square
    assert torch.equal(images, _render(in_memory))


def _guidance_seen(pipe, **kwargs) -> list:
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args, kw: seen.append(kw.get("guidance")),
                                                        with_kwargs=True)
    try:
        _render(pipe, **kwargs)
    finally:
        handle.remove()
    return seen


def test_flux_dev_gets_the_guidance_and_schnell_none():
    dev = build_random_flux_pipeline(guidance_embeds=True)
    seen = _guidance_seen(dev, guidance_scale=3.5)
    assert len(seen) == 3 and all(g is not None and g.tolist() == [3.5, 3.5] for g in seen)
    assert not torch.equal(_render(dev, guidance_scale=3.5), _render(dev, guidance_scale=1.0))
    schnell = build_random_flux_pipeline(guidance_embeds=False)
    assert _guidance_seen(schnell, guidance_scale=3.5) == [None] * 3
    assert schnell.scheduler.config.use_dynamic_shifting is False and dev.scheduler.config.use_dynamic_shifting


def test_sd3_pipeline_is_shaped_like_sd35_medium():
    pipe = build_random_sd3_pipeline()
    config = pipe.transformer.config
    assert config.qk_norm == "rms_norm" and list(config.dual_attention_layers) == [0] and config.patch_size == 2
    assert pipe.transformer.transformer_blocks[-1].context_pre_only  # the last block only reads the text
    # The pipeline pads the CLIP features up to T5's width: T5 must be at least as wide as both CLIPs.
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.text_encoder_3.config.d_model >= clip_width
    assert config.pooled_projection_dim == pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
