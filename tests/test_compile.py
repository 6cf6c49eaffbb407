"""--compile on CPU: the compiled no-grad UNet calls give the eager images and LoRA gradients, toggling adapters
between the prefix, the graded step and the reference compiles nothing after warm-up, memory stays flat in T,
and peft's input-cast switch is bitwise neutral under autocast.

The compiled calls use the `aot_eager` backend: it traces and runs the same graph dynamo and AOTAutograd give
inductor (graph capture, guards, recompiles are all the same), without inductor's code generation, which takes
a minute per graph on this CPU. Inductor's numerics and CUDA graphs are measured on GPU by
benchmarks/speed_memory.py (the compiled-vs-eager difference is one of its columns).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_fixtures import randomise_lora_B
from peft.helpers import disable_input_dtype_casting

from utils.families import load_family
from utils.lora import adapters_disabled, add_lora
from utils.rollout.compile import (
    CompiledDenoiser,
    RecompileError,
    compile_no_grad_denoiser,
    compiled_graph_count,
    no_new_graphs,
)
from utils.rollout.loop import Models, RolloutConfig, draftplus_step

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle", "a blue square"]
# aot_eager runs the decomposed aten graph: same maths, a few ops reassociated (e.g. group_norm's decomposition).
IMAGE_ATOL = 1e-5
GRAD_RTOL = 1e-4


def mean_red(images, prompts):
    return images[:, 0].mean(dim=(1, 2))


def noise(batch=2, seed=0):
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def room_for_every_graph_of_this_module():
    """One process compiles the graphs of several tests (samplers, dtypes, shapes) for the UNet's one forward;
    a training run needs two. Dynamo's default cap of 8 per function would quietly fall back to eager."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=64):
        yield


@pytest.fixture(scope="module")
def setup(tiny_sd_path):
    """A LoRA UNet with a 'trained' (non-zero B) adapter, its eager Models, and the same Models with the
    compiled no-grad calls; warmed up once (prefix with adapters on, reference with adapters off)."""
    family = load_family(str(tiny_sd_path))
    pipe = family.pipe
    for module in (pipe.vae, *family.text_encoders):
        module.requires_grad_(False)
    params = add_lora(pipe.unet, rank=4, lora_alpha=8)
    randomise_lora_B(pipe.unet)
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    eager = Models(family=family, denoiser=pipe.unet, raw_denoiser=pipe.unet, vae=pipe.vae, scheduler=scheduler)
    compiled_unet = compile_no_grad_denoiser(pipe.unet, pipe.vae, backend="aot_eager")
    compiled = Models(family=family, denoiser=pipe.unet, raw_denoiser=pipe.unet, vae=pipe.vae, scheduler=scheduler,
                      no_grad_denoiser=compiled_unet)
    before = compiled_graph_count()
    config = RolloutConfig(num_inference_steps=3, guidance_scale=5.0, truncation_steps=1)
    draftplus_step(compiled, mean_red, PROMPTS, noise(), config, kl_coeff=1.0)[0].backward()
    warm_up_graphs = compiled_graph_count() - before
    for p in params:
        p.grad = None
    yield {"eager": eager, "compiled": compiled, "params": params, "warm_up_graphs": warm_up_graphs,
           "compiled_unet": compiled_unet}
    compiled_unet.close()


def images_and_grads(models, params, config, kl_coeff=1.0):
    loss, rewards, penalty = draftplus_step(models, mean_red, PROMPTS, noise(), config, kl_coeff,
                                            generator=torch.Generator().manual_seed(0))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return rewards, penalty, grads


@pytest.mark.slow
@pytest.mark.parametrize("scheduler_name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_compiled_rollout_gives_the_eager_rewards_penalty_and_lora_gradients(setup, scheduler_name):
    import diffusers

    eager, compiled, params = setup["eager"], setup["compiled"], setup["params"]
    old = eager.scheduler
    scheduler = getattr(diffusers, scheduler_name).from_config(old.config)
    eager.scheduler = compiled.scheduler = scheduler
    try:
        config = RolloutConfig(num_inference_steps=4, guidance_scale=5.0, truncation_steps=2)
        r_e, p_e, g_e = images_and_grads(eager, params, config)
        r_c, p_c, g_c = images_and_grads(compiled, params, config)
    finally:
        eager.scheduler = compiled.scheduler = old
    torch.testing.assert_close(r_c, r_e, atol=IMAGE_ATOL, rtol=0)
    torch.testing.assert_close(p_c, p_e, atol=0, rtol=GRAD_RTOL)
    assert p_e > 0 and g_e.abs().sum() > 0  # the reference differs from the LoRA model: both paths are exercised
    assert ((g_c - g_e).norm() / g_e.norm()).item() < GRAD_RTOL


def test_compiled_images_equal_eager_images_with_and_without_adapters(setup):
    """The two graphs of the one wrapper: adapters on (the prefix) and off (the reference)."""
    unet, compiled_unet = setup["eager"].raw_denoiser, setup["compiled_unet"]
    x, t = noise(), torch.tensor(500)  # the rollout's shapes, dtypes and keywords: the warmed-up graphs
    ehs = torch.randn(4, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    kwargs = dict(encoder_hidden_states=ehs, added_cond_kwargs=None, return_dict=False)
    with torch.no_grad(), no_new_graphs("calls like the rollout's"):
        on = [f(torch.cat([x, x]), t, **kwargs)[0] for f in (unet, compiled_unet)]
        with adapters_disabled(unet):
            off = [f(torch.cat([x, x]), t, **kwargs)[0] for f in (unet, compiled_unet)]
    torch.testing.assert_close(on[1], on[0], atol=IMAGE_ATOL, rtol=0)
    torch.testing.assert_close(off[1], off[0], atol=IMAGE_ATOL, rtol=0)
    assert (on[0] - off[0]).abs().max() > 1e-3  # the adapter matters, so a mixed-up graph would show


def test_toggling_adapters_after_warm_up_compiles_nothing(setup):
    """Prefix (adapters on, compiled), graded step (on, eager), reference (off, compiled), then the next sample:
    two graphs at warm-up, none afterwards, whatever the timesteps, noise and T."""
    compiled, params = setup["compiled"], setup["params"]
    assert setup["warm_up_graphs"] == 2  # one per adapter state
    with no_new_graphs("training samples after warm-up"):
        for seed, steps in ((1, 3), (2, 5), (3, 4)):
            config = RolloutConfig(num_inference_steps=steps, guidance_scale=5.0, truncation_steps=2)
            loss, _, _ = draftplus_step(compiled, mean_red, PROMPTS, noise(seed=seed), config, kl_coeff=1.0)
            loss.backward()
    assert sum(p.grad.abs().sum() for p in params) > 0  # the graded step still trains the LoRA
    for p in params:
        p.grad = None


def test_no_new_graphs_fails_when_a_timed_loop_compiles(setup):
    """The check the benchmark relies on can fail: a new batch size needs a graph the warm-up did not make."""
    compiled = setup["compiled"]
    config = RolloutConfig(num_inference_steps=2, guidance_scale=5.0)
    with pytest.raises(RecompileError):
        with no_new_graphs("a loop with a new shape"), torch.no_grad():
            draftplus_step(compiled, mean_red, ["a cat", "a dog", "a cow"], noise(3), config, kl_coeff=1.0)


def test_memory_kept_for_backward_is_flat_in_t_on_the_compiled_path(setup):
    from benchmarks.speed_memory import saved_activation_bytes

    compiled = setup["compiled"]
    modules = (compiled.raw_denoiser, compiled.vae, *compiled.family.text_encoders)

    def saved(steps):
        config = RolloutConfig(num_inference_steps=steps, guidance_scale=5.0, truncation_steps=1)
        return saved_activation_bytes(lambda: draftplus_step(compiled, mean_red, PROMPTS, noise(), config, 1.0)[0],
                                      modules)

    short, long = saved(2), saved(6)
    assert short == long > 0


@pytest.mark.slow
def test_bf16_autocast_euler_rollout_compiles_two_graphs_and_matches_eager(tiny_sd_path):
    """bf16 weights, fp32 LoRA, CPU bf16 autocast, Euler (which hands back bf16 latents after an fp32 first one):
    the compiled wrapper feeds the UNet what autocast would (one graph per adapter state, not two), with the
    eager rollout's numbers."""
    import diffusers

    family = load_family(str(tiny_sd_path))
    pipe = family.pipe
    for module in (pipe.unet, pipe.vae, *family.text_encoders):
        module.requires_grad_(False).to(torch.bfloat16)
    params = add_lora(pipe.unet, rank=4)
    randomise_lora_B(pipe.unet)
    scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    eager = Models(family=family, denoiser=pipe.unet, raw_denoiser=pipe.unet, vae=pipe.vae, scheduler=scheduler)
    config = RolloutConfig(num_inference_steps=4, guidance_scale=5.0, truncation_steps=1)

    def run(models):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return images_and_grads(models, params, config)

    r_e, p_e, g_e = run(eager)
    compiled_unet = compile_no_grad_denoiser(pipe.unet, pipe.vae, backend="aot_eager")
    try:
        compiled = Models(family=family, denoiser=pipe.unet, raw_denoiser=pipe.unet, vae=pipe.vae, scheduler=scheduler,
                          no_grad_denoiser=compiled_unet)
        before = compiled_graph_count()
        r_c, p_c, g_c = run(compiled)
        assert compiled_graph_count() - before == 2
    finally:
        compiled_unet.close()
    assert torch.equal(r_c, r_e) and torch.equal(p_c, p_e) and torch.equal(g_c, g_e)


def test_input_dtype_casting_off_is_bitwise_identical_under_bf16_autocast_with_fewer_ops(tiny_sd_path):
    """The switch --compile flips on the LoRA layers: bf16 weights, fp32 LoRA, CPU bf16 autocast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    unet = load_family(str(tiny_sd_path)).denoiser.to(torch.bfloat16)
    add_lora(unet, rank=4)
    randomise_lora_B(unet)
    x, t = noise().to(torch.bfloat16), torch.tensor(500)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim).to(torch.bfloat16)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), CountOps() as ops:
            out = unet(x, t, encoder_hidden_states=ehs, return_dict=False)[0]
        return out, ops.n

    cast, n_cast = run()
    with disable_input_dtype_casting(unet):
        plain, n_plain = run()
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, plain)
    assert n_plain < n_cast


def test_compiled_unet_is_a_wrapper_not_the_module_compiled_in_place(setup):
    unet, compiled_unet = setup["eager"].raw_denoiser, setup["compiled_unet"]
    assert isinstance(compiled_unet, CompiledDenoiser)
    assert compiled_unet.compiled._orig_mod is unet  # an OptimizedModule around the module
    assert getattr(unet, "_compiled_call_impl", None) is None  # the module itself stays eager (no `.compile()`)
    assert compiled_unet.options["backend"] == "aot_eager" and not compiled_unet.cuda_graphs


# ------------------------------------------------------------------------------------------ the trainer


@pytest.mark.slow
def test_trainer_with_compile_logs_the_eager_runs_metrics(tiny_sd_path, tmp_path):
    """`--compile` end to end under accelerate launch (aot_eager through the debugging variable): the same
    rewards and penalties step by step as the eager run."""

    def train(out, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "cpu.yaml"), str(ROOT / "train_draftplus.py"),
               "--pretrained_model_name_or_path", str(tiny_sd_path), "--reward", "redness", "--prompts", "animals",
               "--resolution", "32", "--num_inference_steps", "3", "--guidance_scale", "3", "--kl_coeff", "0.1",
               "--learning_rate", "1e-2", "--max_train_steps", "2", "--output_dir", str(out), "--report_to", "none",
               *extra]
        # TORCH_LOGS=recompiles: dynamo says when the adapters-off graph joins the adapters-on one.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "DRAFTPLUS_COMPILE_BACKEND": "aot_eager",
               "TORCH_LOGS": "recompiles"}
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], result.stderr

    (eager, eager_log), (compiled, compiled_log) = train(tmp_path / "eager"), train(tmp_path / "compiled", "--compile")
    # One recompile in two steps: the adapters-off graph, compiled once; every later toggle finds its graph.
    assert compiled_log.count("[__recompiles] Recompiling function") == 1 and "requires_grad mismatch" in compiled_log
    assert "Recompiling" not in eager_log
    assert [m["step"] for m in compiled] == [1, 2]
    for e, c in zip(eager, compiled, strict=True):
        assert c["reward"] == pytest.approx(e["reward"], abs=1e-5)
        assert c["kl_penalty"] == pytest.approx(e["kl_penalty"], rel=1e-3, abs=1e-9)
    assert compiled[1]["kl_penalty"] > 0  # the LoRA moved at step 1: the reference pass is exercised


def test_compile_flag_fails_in_one_line_where_torch_compile_cannot_run(monkeypatch, tiny_sd_path, tmp_path, capsys):
    import train_draftplus
    import utils.rollout.compile

    monkeypatch.setattr(utils.rollout.compile, "compile_unsupported_reason", lambda: "--compile: not on this build")
    with pytest.raises(SystemExit) as exc:
        train_draftplus.parse_args(["--pretrained_model_name_or_path", str(tiny_sd_path), "--reward", "redness",
                                    "--prompts", "animals", "--output_dir", str(tmp_path), "--compile"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["train_draftplus.py: error: --compile: not on this build"]
    assert not any(tmp_path.iterdir())
