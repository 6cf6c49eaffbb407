"""utils/tiny_models.py: the generated tokenizer, the shared component configs and the random tiny pipelines."""

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from utils.tiny_models import (
    build_clip_tokenizer,
    build_random_pipeline,
    build_random_sdxl_pipeline,
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
