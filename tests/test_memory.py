"""The memory estimator (utils/memory): its figure for a tiny model against a real CPU trace of the same step,
counted by the same tracker on real tensors; what moves it; the parts it computes; the command line."""

import copy

import pytest
import torch

import train_draftplus
from rewards import build_reward
from utils.memory import estimate as estimate_module
from utils.memory import estimate_memory, render
from utils.memory.build import ESTIMATE_PROMPT
from utils.memory.estimate import prepare_training, rollout_config
from utils.memory.parts import adam8bit_bytes, nf4_linears, nf4_parts
from utils.memory.step import GRADED, LORA, OPTIMISER, traced_step, weights_label
from utils.memory.trace import SETUP, MemoryTrace


def estimate_args(path, *extra):
    return train_draftplus.parse_args(["--pretrained_model_name_or_path", str(path), "--estimate_memory",
                                       "--reward", "redness", "--num_inference_steps", "4", "--report_to", "none",
                                       *extra])


def real_trace(args) -> MemoryTrace:
    """The step the estimate traces, on the tiny model's real weights, with the real reward."""
    checked = args.checked
    family = checked.family.load(args.pretrained_model_name_or_path, **checked.family_options)
    for module in (*family.text_encoders, family.denoiser, family.vae):
        module.requires_grad_(False).eval()
    models, lora_params, optimizer, _ = prepare_training(family, args, checked)
    torch.manual_seed(0)
    noise = torch.randn(family.latent_shape(args.train_batch_size, args.height, args.width))
    return traced_step(MemoryTrace(), models, build_reward(args.reward), lora_params, optimizer,
                       [ESTIMATE_PROMPT] * args.train_batch_size, noise, rollout_config(args),
                       kl_coeff=args.kl_coeff, max_grad_norm=args.max_grad_norm)


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_flux_dev_path"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.slow  # builds and traces models: tens of seconds
def test_estimate_is_what_a_real_step_allocates(fixture, checkpointing, request):
    path = request.getfixturevalue(fixture)
    args = estimate_args(path, "--resolution", "32", *(["--gradient_checkpointing"] if checkpointing else []))
    estimate = estimate_memory(args, args.checked)
    real = real_trace(args)
    held = estimate.held()
    # What the estimate built but a loaded model does not hold (a scheduler's few numbers) is all it adds.
    assert held.get(SETUP, 0) < 0.01 * estimate.total
    assert estimate.total - held.get(SETUP, 0) == pytest.approx(real.peak.total, rel=0.01)
    assert estimate.peak.phase == real.peak.phase
    for label in (weights_label(args.checked.family.denoiser_name), weights_label("vae"), LORA, OPTIMISER):
        assert held[label] == real.peak.held[label]
    assert estimate.phase_peaks[GRADED] > 0


@pytest.mark.slow  # builds and traces models: tens of seconds
def test_checkpointing_and_size_move_the_estimate(tiny_sd_path):
    def total(*extra):
        args = estimate_args(tiny_sd_path, *extra)
        return estimate_memory(args, args.checked)

    plain, checkpointed, larger = total("--resolution", "32"), total("--resolution", "32", "--gradient_checkpointing"), \
        total("--resolution", "64")
    assert checkpointed.held()[GRADED] < plain.held()[GRADED]
    assert larger.total > plain.total
    # the weights do not depend on the image size
    assert larger.held()[weights_label("unet")] == plain.held()[weights_label("unet")]


@pytest.mark.slow  # builds and traces models: tens of seconds
def test_vae_checkpointing_moves_the_qwen_image_estimate(tiny_qwen_image_path):
    """Qwen-Image's VAE, which diffusers cannot checkpoint, is checkpointed by the family: per up block with
    --gradient_checkpointing, per block with --vae_block_checkpointing, each estimate lower."""
    def total(*extra):
        args = estimate_args(tiny_qwen_image_path, "--resolution", "256", "--max_sequence_length", "16", *extra)
        return estimate_memory(args, args.checked).total

    plain, per_up_block = total(), total("--gradient_checkpointing")
    per_block = total("--gradient_checkpointing", "--vae_block_checkpointing")
    assert per_block < per_up_block < plain


@pytest.mark.slow  # builds and traces models: tens of seconds
def test_a_second_copy_of_the_denoiser_moves_the_estimate(tiny_sd_path, monkeypatch):
    args = estimate_args(tiny_sd_path, "--resolution", "32")
    before = estimate_memory(args, args.checked)
    prepare = estimate_module.prepare_training
    kept = []

    def with_a_frozen_copy(family, args, checked):
        kept.append(copy.deepcopy(family.denoiser))  # e.g. a reference model kept beside the LoRA one
        return prepare(family, args, checked)

    monkeypatch.setattr(estimate_module, "prepare_training", with_a_frozen_copy)
    after = estimate_memory(args, args.checked)
    denoiser_bytes = before.held()[weights_label("unet")]
    assert after.total - before.total == pytest.approx(denoiser_bytes, rel=0.01)
    assert after.held()[SETUP] >= denoiser_bytes


def test_nf4_and_8bit_parts_follow_bitsandbytes_formats():
    linears = [torch.nn.Linear(128, 256, dtype=torch.bfloat16), torch.nn.Linear(256, 64, dtype=torch.bfloat16)]
    weights, transient = nf4_parts(linears)
    numel = 128 * 256 + 256 * 64
    assert weights.bytes == numel // 2 + numel // 64 * 4 - 2 * numel
    assert transient.bytes == 2 * 128 * 256
    params = [torch.zeros(8192), torch.zeros(100)]  # one 8-bit, one under bitsandbytes' min_8bit_size (fp32)
    assert adam8bit_bytes(params) == 2 * 8192 + 2 * 4 * (8192 // 256) + 2 * 4 * 100
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv2d(4, 4, 1))
    assert nf4_linears(model) == [model[0]]


@pytest.mark.slow  # builds and traces models: tens of seconds
def test_use_8bit_adam_replaces_the_traced_state(tiny_sd_path):
    args = estimate_args(tiny_sd_path, "--resolution", "32", "--use_8bit_adam")
    estimate = estimate_memory(args, args.checked)
    assert OPTIMISER not in estimate.held()
    assert estimate.held()[f"{OPTIMISER} (8-bit)"] > 0
    assert any("8-bit" in note for note in estimate.notes)


@pytest.mark.slow  # builds and traces models: tens of seconds
def test_estimate_memory_flag_prints_and_trains_nothing(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "run"
    args = estimate_args(tiny_sd_path, "--resolution", "32", "--output_dir", str(out))
    train_draftplus.main(args)
    printed = capsys.readouterr().out
    assert printed.startswith("Estimated peak GPU memory of one training step")
    for line in ("24 GB: fits", "48 GB: fits", "80 GB: fits", weights_label("unet"), "graded steps"):
        assert line in printed
    assert not out.exists()


def test_report_names_what_does_not_fit():
    from utils.memory.estimate import MemoryEstimate
    from utils.memory.trace import Peak

    estimate = MemoryEstimate(Peak(30 * 10**9, GRADED, {weights_label("transformer"): 30 * 10**9}), {GRADED: 30 * 10**9})
    text = render(estimate)
    assert "24 GB: does not fit" in text and "48 GB: fits" in text


def test_the_peak_is_the_prompt_encoding_when_offloaded_encoders_make_it():
    """With --offload_text_encoders the prompt encoding's peak (the encoders on the GPU) is a floor: where it is
    above the step's traced peak less the encoders, the report and the table say the peak comes then."""
    from utils.memory.estimate import ComputedPart, MemoryEstimate
    from utils.memory.step import PROMPTS
    from utils.memory.trace import Peak

    offloaded = [ComputedPart("weights: text_encoders (offloaded)", -10 * 10**9, "")]
    traced = Peak(30 * 10**9, GRADED, {weights_label("transformer"): 20 * 10**9})
    floor_wins = MemoryEstimate(traced, {PROMPTS: 25 * 10**9, GRADED: 30 * 10**9}, offloaded, floor=25 * 10**9)
    assert floor_wins.total == 25 * 10**9 and floor_wins.peak_phase == PROMPTS
    assert f"comes during: {PROMPTS}" in render(floor_wins) and f"Held at the {GRADED} peak" in render(floor_wins)
    step_wins = MemoryEstimate(traced, {PROMPTS: 15 * 10**9, GRADED: 30 * 10**9}, offloaded, floor=15 * 10**9)
    assert step_wins.total == 20 * 10**9 and step_wins.peak_phase == GRADED


def test_reward_from_architecture_scores_on_the_rewards_own_code_path():
    from transformers import CLIPConfig

    from rewards.pickscore import PickScoreReward

    tiny = {"projection_dim": 16,
            "text_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "max_position_embeddings": 77, "vocab_size": 99},
            "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "patch_size": 14, "image_size": 224}}
    reward = PickScoreReward.from_architecture(CLIPConfig(**tiny), dtype=torch.float32, gradient_checkpointing=True)
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    scores = reward(images, ["a cat", "a dog"])
    assert scores.shape == (2,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())
    # PickScore's published network: CLIP ViT-H/14 (a 1280-wide, 32-layer image tower, 1024-d embeddings)
    config = PickScoreReward.architecture()
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers, config.projection_dim) == \
        (1280, 32, 1024)


def test_rewards_without_an_architecture_are_named_not_counted():
    from rewards import build_reward_from_architectures

    reward, notes = build_reward_from_architectures("redness")
    assert notes == [] and reward(torch.rand(1, 3, 8, 8), ["x"]).shape == (1,)
    reward, notes = build_reward_from_architectures("redness=1,aesthetic=0.1")
    assert len(notes) == 1 and "aesthetic" in notes[0] and "not counted" in notes[0]


def test_a_fake_tensor_indexed_by_a_real_mask_has_the_masks_size():
    """Pipelines drop padded tokens with `hidden[mask]` (Qwen-Image's encode_prompt): the mask is real, so the
    estimate's weightless tensors take its real count instead of failing on a data-dependent size."""
    from torch._subclasses.fake_tensor import FakeTensor

    from utils.memory.fake import WeightlessMode

    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    with WeightlessMode():
        hidden = torch.empty(2, 4, 3)
        selected = hidden[mask]
        assert isinstance(selected, FakeTensor) and selected.shape == (5, 3)
        assert hidden[:, mask[1]].shape == (2, 3, 3)
