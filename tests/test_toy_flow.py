"""The pretrained flow toy: its build (utils/toys/flow_pretrain.py), its cache and committed copy (utils/toys/toy.py);
it must follow its captions with the diffusers pipeline's own `__call__`."""

import json
import os

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file
from toy_checks import assert_same_configs, caption_following, fake_toy_training
from transformers import CLIPTextModelWithProjection

from utils.families import read_model_index
from utils.toys import data as toy_data
from utils.toys import flow_pretrain as toy_flow_pretrain
from utils.toys import toy
from utils.toys.flow_pretrain import FlowToyTrainConfig, ZeroTokensAttention, untrained_flow_toy_pipeline
from utils.toys.tiny_models import build_random_sd3_pipeline
from utils.toys.toy import resolve_model_path

FLOW = toy.TOYS["toy-flow"]
slow = pytest.mark.skipif(os.environ.get("DRAFTPLUS_SLOW") != "1",
                          reason="rebuilds the flow toy (~3 min); DRAFTPLUS_SLOW=1")
# Colour accuracy the toy must reach (chance: 1/6). The committed build, 10 steps, guidance 5, seeds 0-2: 0.96-0.98
# at the default max_sequence_length (256), 0.94-1.0 at 16; with an untrained transformer 0.11-0.22 (one seed).
FOLLOWS = 0.8


@pytest.fixture(scope="module")
def flow_toy() -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(FLOW.assets_dir)  # no text_encoder_3=None needed
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------- committed flow toy


def test_committed_flow_toy_is_current_and_small():
    info = toy.read_build_info(FLOW.assets_dir)
    assert info is not None, "assets/toy-flow is missing: python -m utils.toys --toy toy-flow --output_dir " \
                             "assets/toy-flow --force"
    assert info["cache_key"] == toy.toy_cache_key(name="toy-flow"), (
        "the flow toy's version (FLOW_TOY_VERSION) or config changed since assets/toy-flow was built; rebuild it "
        "with `python -m utils.toys --toy toy-flow --output_dir assets/toy-flow --force` and commit it")
    assert info["toy_version"] == toy_flow_pretrain.FLOW_TOY_VERSION
    size = sum(f.stat().st_size for f in FLOW.assets_dir.rglob("*") if f.is_file())
    assert size < 5 * 2**20
    assert toy.build_toy_pipeline(name="toy-flow", log=pytest.fail) == FLOW.assets_dir  # no rebuild when current
    assert resolve_model_path("toy-flow") == str(FLOW.assets_dir)
    assert (FLOW.assets_dir / "prompts.txt").read_text().splitlines() == toy_data.toy_prompts()


def test_committed_flow_toy_has_the_architecture_the_code_builds(tmp_path):
    """The cache key trusts FLOW_TOY_VERSION to be bumped when the build changes; this catches a forgotten bump
    for what can be checked in seconds: tokenizers, module and scheduler configs, the pipeline's layout."""
    untrained_flow_toy_pipeline().save_pretrained(tmp_path)
    assert_same_configs(tmp_path, FLOW.assets_dir, extra_files=(toy.BUILD_INFO_FILE,),
                        version_name="FLOW_TOY_VERSION")


def test_committed_flow_toy_is_an_sd3_checkpoint_with_a_muted_t5(flow_toy):
    assert json.loads((FLOW.assets_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert isinstance(flow_toy.scheduler, FlowMatchEulerDiscreteScheduler)
    modules = (flow_toy.transformer, flow_toy.vae, flow_toy.text_encoder, flow_toy.text_encoder_2,
               flow_toy.text_encoder_3)
    assert {m.dtype for m in modules} == {torch.float32}
    # Stored fp16 (half the size), loaded fp32; the trainer loads components one by one.
    weights = load_file(next((FLOW.assets_dir / "transformer").glob("*.safetensors")))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert CLIPTextModelWithProjection.from_pretrained(FLOW.assets_dir, subfolder="text_encoder").dtype == torch.float32
    with torch.no_grad():
        embeds, _, pooled, _ = flow_toy.encode_prompt(["a red circle", "a blue square on a white background"],
                                                      prompt_2=None, prompt_3=None, max_sequence_length=32,
                                                      do_classifier_free_guidance=False)
    clip_tokens = flow_toy.tokenizer.model_max_length
    assert embeds.shape == (2, clip_tokens + 32, 64) and pooled.shape == (2, 64)
    assert embeds[:, clip_tokens:].abs().max() == 0  # T5 says nothing: exactly SD3 with T5 dropped
    assert (embeds[0, :clip_tokens] - embeds[1, :clip_tokens]).abs().max() > 0.1


def test_flow_toy_follows_its_captions(flow_toy):
    """Colour accuracy of the pipeline's own samples vs their captions (chance: 1/6), at the pipeline's default
    `max_sequence_length` (256 zero T5 tokens) and at 16: the toy was trained for any number of them."""
    acc = caption_following(flow_toy, guidance_scale=5.0, num_inference_steps=10)
    print(f"flow toy caption-following accuracy (guidance 5, 10 steps): {acc}")
    assert min(acc.values()) >= FOLLOWS
    short_text = caption_following(flow_toy, guidance_scale=5.0, num_inference_steps=10, max_sequence_length=16)
    print(f"... with max_sequence_length 16: {short_text}")
    assert min(short_text.values()) >= FOLLOWS


def test_the_caption_check_fails_an_untrained_transformer(flow_toy):
    """The same check on the committed pipeline with its transformer re-initialised: the check can fail, and it
    is the transformer's training that makes the captions followed."""
    torch.manual_seed(0)
    untrained = StableDiffusion3Pipeline(**{**flow_toy.components,
                                            "transformer": SD3Transformer2DModel.from_config(flow_toy.transformer.config)})
    acc = caption_following(untrained, guidance_scale=5.0, num_inference_steps=10, seeds=(0,))
    print(f"untrained transformer caption-following accuracy: {acc}")
    assert max(acc.values()) < 0.5


def test_zero_tokens_attention_is_the_attention_over_that_many_zero_tokens():
    """Training shows the transformer one zero T5 token with a log-count bias; that must be exactly the stock
    attention over that many zero tokens (the pipeline's `max_sequence_length`), per sample."""
    torch.manual_seed(0)
    pipe = untrained_flow_toy_pipeline(FlowToyTrainConfig(num_layers=2))
    transformer = pipe.transformer.eval()
    prompts = ["a red circle", "a blue square on a white background"]

    def velocity(zero_tokens, log_counts=None):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=["", ""],  # T5 is muted anyway
                                                  max_sequence_length=zero_tokens, do_classifier_free_guidance=False)
        stock = transformer.attn_processors
        if log_counts is not None:
            processor = ZeroTokensAttention()
            processor.log_counts = log_counts
            transformer.set_attn_processor(processor)
        try:
            return transformer(hidden_states=x, timestep=torch.tensor([700.0, 200.0]),
                               encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
        finally:
            transformer.set_attn_processor(stock)

    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for count in (1, 7, 300):
            one = velocity(1, log_counts=torch.log(torch.tensor([float(count)] * 2)))
            torch.testing.assert_close(one, velocity(count), rtol=1e-5, atol=1e-5)
        assert (velocity(1) - velocity(7)).abs().max() > 1e-3  # the count matters to the stock attention
        mixed = velocity(1, log_counts=torch.log(torch.tensor([7.0, 300.0])))
        torch.testing.assert_close(mixed[0], velocity(7)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[1], velocity(300)[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- cache logic


def test_flow_toy_cache_key_is_its_version_and_config(monkeypatch):
    key = toy.toy_cache_key(name="toy-flow")
    assert key == toy.toy_cache_key(FlowToyTrainConfig(), name="toy-flow") and key != toy.toy_cache_key()
    assert toy.toy_cache_key(FlowToyTrainConfig(steps=2501), name="toy-flow") != key
    with pytest.raises(TypeError, match="FlowToyTrainConfig"):
        toy.toy_cache_key(toy.ToyTrainConfig(), name="toy-flow")
    unet_key = toy.toy_cache_key()
    monkeypatch.setattr(toy_flow_pretrain, "FLOW_TOY_VERSION", toy_flow_pretrain.FLOW_TOY_VERSION + 1)
    assert toy.toy_cache_key(name="toy-flow") != key and toy.toy_cache_key() == unet_key  # each toy its own


def test_flow_toy_build_caches_by_its_cache_key(tmp_path, monkeypatch):
    """The cache for the flow toy, with training replaced by a random SD3 pipeline (seconds, not minutes)."""
    calls = fake_toy_training(monkeypatch, tmp_path / "cache", "toy-flow", build_random_sd3_pipeline)  # version 1000
    quiet = {"log": lambda message: None, "name": "toy-flow"}
    threads = torch.get_num_threads()
    path = toy.build_toy_pipeline(**quiet)
    assert path == tmp_path / "cache" / f"toy-flow-{toy.toy_cache_key(name='toy-flow')[:16]}" and len(calls) == 1
    info = toy.read_build_info(path)
    assert info["toy_version"] == 1000 and info["config"]["steps"] == FlowToyTrainConfig().steps
    assert info["threads"] == 1 and torch.get_num_threads() == threads  # built on one thread, then restored
    weights = load_file(next((path / "transformer").glob("*.safetensors")))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    assert StableDiffusion3Pipeline.from_pretrained(path).transformer.dtype == torch.float32
    assert toy.build_toy_pipeline(**quiet) == path and len(calls) == 1  # cached
    assert toy.build_toy_pipeline(**{**quiet, "name": "toy"}) == toy.ASSETS_DIR and len(calls) == 1  # the other toy


def test_flow_toy_family_is_read_without_building_it(monkeypatch, tmp_path):
    def no_build(*args, **kwargs):
        raise AssertionError("reading the flow toy's model_index.json built it")

    monkeypatch.setattr(toy, "build_toy_pipeline", no_build)
    monkeypatch.setattr(toy_flow_pretrain, "FLOW_TOY_VERSION", 1000)  # stale: loading its weights would build
    committed = json.loads((FLOW.assets_dir / "model_index.json").read_text())
    assert read_model_index("toy-flow") == committed == read_model_index("toy-flow", local_only=True)


def test_check_command_reports_every_toy_and_fails_if_one_is_stale(monkeypatch, capsys):
    monkeypatch.setattr(toy_flow_pretrain, "FLOW_TOY_VERSION", toy_flow_pretrain.FLOW_TOY_VERSION + 1)
    with pytest.raises(SystemExit) as stale:
        toy.main(["--check"])
    out = capsys.readouterr().out.splitlines()
    assert stale.value.code == 1 and len(out) == 2
    assert out[0].startswith("assets/toy is current: ")
    assert "toy-flow's training code (FLOW_TOY_VERSION" in out[1] and "assets/toy-flow" in out[1]
    toy.main(["--check", "--toy", "toy"])  # one toy alone: current, exit status 0
    assert capsys.readouterr().out.startswith("assets/toy is current: ")


@slow
@pytest.mark.slow
def test_rebuild_flow_toy_from_scratch(tmp_path):
    """The full build: within the 5-minute budget on 2 cores, and as good as the committed copy."""
    path = toy.build_toy_pipeline(tmp_path / "toy-flow", force=True, name="toy-flow")
    info = toy.read_build_info(path)
    assert info["cache_key"] == toy.toy_cache_key(name="toy-flow")
    print(f"flow toy build: {info['seconds']} s on {info['threads']} threads")
    assert info["seconds"] < 300
    acc = caption_following(path, guidance_scale=5.0, num_inference_steps=10)
    print(f"rebuilt flow toy caption-following accuracy: {acc}")
    assert min(acc.values()) >= FOLLOWS
