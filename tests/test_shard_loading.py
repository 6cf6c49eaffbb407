"""`--shard` with the weights read by rank 0 alone (utils/run/empty_models.py, `sharding.load_from_rank0`), on CPU:
two processes over gloo on the tiny FLUX.1-dev and FLUX.2-dev pipelines; and hybrid sharding (`--shard_size`).

Rank 1 loads from a copy of the model without the weight files of the modules that are sharded, so it cannot have
read them; after the broadcast its sharded model is bitwise the one every rank loading everything gives: every
weight and buffer (the non-persistent ones, in no state dict, included), the LoRA, the prompt embeddings, the
predictions and the LoRA gradients.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fsdp import env_with

from utils.run.empty_models import empty_sharded_components

ROOT = Path(__file__).resolve().parents[1]

@pytest.mark.parametrize("fixture", ["tiny_sd3_path", "tiny_flux_dev_path", "tiny_flux2_dev_path",
                                     "tiny_qwen_image_path", "tiny_z_image_path"])
def test_the_empty_modules_have_the_loaded_ones_names_shapes_and_dtypes(fixture, request):
    """What rank 0's broadcast fills, for every family that shards and text encoders of every kind (CLIP, T5,
    Mistral3, Qwen2.5-VL, Qwen3), built on the meta device from the configs alone: the loaded modules' parameters
    and buffers (persistent or not), by name, shape and (for parameters) dtype."""
    from utils.families import load_family
    from utils.run.sharding import modules_to_shard

    path = str(request.getfixturevalue(fixture))
    family = load_family(path, dtype=torch.bfloat16)
    empty = empty_sharded_components(type(family), path, None, torch.bfloat16)
    loaded = {name: getattr(family.pipe, name) for name in empty}
    assert list(loaded.values()) == modules_to_shard(family)  # the same modules rank 0 shards

    def layout(module):  # a buffer's dtype may differ (SD3's fp32 pos_embed): the broadcast gives it rank 0's
        return [(name, t.shape, t.dtype if isinstance(t, torch.nn.Parameter) else None,
                 name.rpartition(".")[2] in module.get_submodule(name.rpartition(".")[0])._non_persistent_buffers_set)
                for name, t in [*module.named_parameters(), *module.named_buffers()]]

    for name, module in empty.items():
        assert all(t.is_meta for t in [*module.parameters(), *module.buffers()]), name
        assert layout(module) == layout(loaded[name]), name


WORKER = r'''
import json, sys
import torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from utils.families import family_of
from utils.lora import add_lora, adapters_disabled
from utils.run.empty_models import empty_sharded_components
from utils.run.sharding import modules_to_shard, shard_models

model, weightless, out = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
result = {}


def sharded(from_rank0):
    """The tiny FLUX sharded over the two processes with a trained-looking LoRA; `from_rank0`: rank 1 reads no
    weight of the sharded modules (its model directory has none)."""
    path, empty = model, {}
    if from_rank0 and rank == 1:
        path = weightless
        empty = empty_sharded_components(family_of(path), path, None, torch.float32)
        result["built_on_meta"] = sorted(empty), all(t.is_meta for m in empty.values()
                                                     for t in [*m.parameters(), *m.buffers()])
    family = family_of(path).load(path, components=empty, max_sequence_length=16)
    torch.manual_seed(0)
    targets = family.target_modules(["attention+ff"], dict(family.denoiser.config))
    lora = add_lora(family.denoiser, 4, 8, 0.0, targets)
    with torch.no_grad():  # PEFT starts B at zero; rank 1's LoRA is rank 0's after shard_models
        for p in lora:
            if not p.is_meta:
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    shard_models(family, lora, torch.device("cpu"), from_rank0=from_rank0)
    return family, lora


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


every, (first, first_lora) = sharded(False), sharded(True)
pairs = [(a, b) for whole, empty in zip(modules_to_shard(every[0]), modules_to_shard(first), strict=True)
         for a, b in zip([*whole.named_parameters(), *whole.named_buffers()],
                         [*empty.named_parameters(), *empty.named_buffers()], strict=True)]
result["names_match"] = all(a[0] == b[0] for a, b in pairs)
result["tensors"] = len(pairs)
result["weights_differ"] = [a[0] for a, b in pairs if not torch.equal(full(a[1]), full(b[1]))]
result["non_persistent_buffers"] = [name for module in modules_to_shard(first) for name, _ in module.named_buffers()
                                    if name.rpartition(".")[2] in module.get_submodule(
                                        name.rpartition(".")[0])._non_persistent_buffers_set]
result["lora_real"] = not any(p.is_meta for p in first_lora)
result["lora_equal"] = all(torch.equal(a, b) for a, b in zip(every[1], first_lora, strict=True))

generator = torch.Generator().manual_seed(1 + rank)
x = torch.randn(first.latent_shape(1, 48, 32), generator=generator)
t = torch.tensor([700.0])
prompt = ["a red cat" if rank == 0 else "a small blue dog"]
for name, (family, lora) in (("every", every), ("rank0", (first, first_lora))):
    cond = family.encode_prompts(prompt)
    with torch.no_grad(), adapters_disabled(family.denoiser):
        reference = family.predict(family.denoiser, x, t, cond, 3.5)
    prediction = family.predict(family.denoiser, x, t, cond, 3.5)
    prediction.square().mean().backward()
    result[name] = {"embeds": {k: v.tolist() for k, v in cond.cond.items() if torch.is_tensor(v)},
                    "reference": reference.tolist(), "prediction": prediction.tolist(),
                    "grads": [p.grad.tolist() for p in lora]}
json.dump(result, open(f"{out}/rank{rank}.json", "w"))
'''


@pytest.mark.slow
@pytest.mark.parametrize("fixture, port, buffer", [("tiny_flux_dev_path", 29591, "position_ids"),
                                                   ("tiny_flux2_dev_path", 29589, "rotary_emb.inv_freq")])
def test_rank0_alone_reads_the_sharded_weights_and_every_rank_ends_bitwise_as_if_all_had(fixture, port, buffer,
                                                                                         request, tmp_path):
    from utils.families import family_of

    model_path = request.getfixturevalue(fixture)
    family = family_of(str(model_path))
    sharded = empty_sharded_components(family, str(model_path), None, torch.float32)
    assert family.denoiser_name in sharded and len(sharded) == 2  # the denoiser and one text encoder
    weightless = tmp_path / "weightless"
    shutil.copytree(model_path, weightless)
    for name in sharded:
        removed = list((weightless / name).glob("*.safetensors"))
        assert removed
        for file in removed:
            file.unlink()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(port), str(worker), str(model_path), str(weightless),
                             str(tmp_path)], cwd=ROOT, env=env_with(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[1]["built_on_meta"] == [sorted(sharded), True] and "built_on_meta" not in ranks[0]
    for r in ranks:
        assert r["names_match"] and r["tensors"] > 20 and r["weights_differ"] == [], r["weights_differ"]
        # CLIP's position ids, Mistral's rotary frequencies: in no state dict, rank 0's, not left empty
        assert any(name.endswith(buffer) for name in r["non_persistent_buffers"]), r["non_persistent_buffers"]
        assert r["lora_real"] and r["lora_equal"]
        assert r["rank0"] == r["every"]  # bitwise: embeddings, reference, prediction, LoRA gradients
    assert ranks[0]["rank0"]["prediction"] != ranks[1]["rank0"]["prediction"]  # each rank its own prompt and noise


def test_the_committed_host_memory_results_are_the_benchmarks_rendering_and_rank1_loads_less():
    from benchmarks.shard_host_memory import render

    results_dir = ROOT / "benchmarks" / "results"
    results = json.loads((results_dir / "shard_host_memory.json").read_text())
    assert (results_dir / "shard_host_memory.md").read_text() == render(results)
    cost = results["rank1_cost_mib"]
    shard = sum(results["sharded_weights_bytes"].values()) / 2 / 2**20
    assert cost["rank0"] < cost["every"] - 0.9 * shard  # rank 1 no longer holds the sharded modules whole


# ----------------------------------------------------------------------------------------------
# Hybrid sharding (--shard_size): shard within groups of processes, replicate across them
# ----------------------------------------------------------------------------------------------
def shard_args(**overrides):
    from test_fsdp import shard_args as base

    return base(**{"shard_size": None, **overrides})


@pytest.mark.parametrize("overrides, world, env, expected", [
    ({"shard_size": 3}, 4, {}, "--shard_size 3 must be 2 or more and divide the 4 processes"),
    ({"shard_size": 1}, 4, {}, "--shard_size 1 must be 2 or more"),
    ({"shard_size": 8}, 4, {}, "--shard_size 8 must be 2 or more and divide the 4 processes"),
    ({"shard": False, "shard_size": 2}, 4, {}, "--shard_size sizes the groups --shard splits the frozen model over"),
    ({"shard_size": 2}, 4, {}, None),
    ({"shard_size": 4}, 4, {}, None),  # one group: what --shard does without it
])
def test_a_shard_size_that_does_not_divide_the_processes_is_refused(overrides, world, env, expected):
    from test_fsdp import flux

    from utils.run.sharding import shard_problem

    problem = shard_problem(shard_args(**overrides), flux(), world, env=env)
    assert (problem is None) if expected is None else expected in problem


def test_an_accelerate_hybrid_shard_config_shards_within_each_machine():
    from test_fsdp import flux

    from utils.run.sharding import shard_problem

    hybrid = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "HYBRID_SHARD", "LOCAL_WORLD_SIZE": "8"}
    args = shard_args(shard=False)
    assert shard_problem(args, flux(), 16, env=hybrid) is None and args.shard and args.shard_size == 8
    args = shard_args(shard=False)  # accelerate also passes the strategy as FSDP1's number (HYBRID_SHARD = 4)
    assert shard_problem(args, flux(), 16, env={**hybrid, "FSDP_SHARDING_STRATEGY": "4"}) is None
    assert args.shard_size == 8
    args = shard_args(shard_size=4)  # the command line wins
    assert shard_problem(args, flux(), 16, env=hybrid) is None and args.shard_size == 4
    args = shard_args(shard=False)  # FULL_SHARD (accelerate's default): all processes, as --shard
    assert shard_problem(args, flux(), 16, env={**hybrid, "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}) is None
    assert args.shard_size is None


def test_the_command_line_refuses_a_shard_size_in_one_line_before_loading(tiny_flux_dev_path, tmp_path,
                                                                          monkeypatch, capsys):
    import train_draftplus

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(SystemExit) as exit_info:
        train_draftplus.parse_args(["--pretrained_model_name_or_path", str(tiny_flux_dev_path), "--reward",
                                    "redness", "--height", "48", "--width", "32", "--output_dir", str(tmp_path / "out"),
                                    "--report_to", "none", "--shard", "--shard_size", "3"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--shard_size 3 must be 2 or more and divide the 4 processes" in lines[0], lines
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_four_processes_sharded_in_pairs_end_with_the_lora_of_four_ddp_processes(tiny_flux_dev_path, tmp_path):
    from test_fsdp import REWARD, SCRIPT, max_abs_difference, metrics, train_args

    from utils.lora import LORA_WEIGHTS_NAME

    (tmp_path / "reward.py").write_text(REWARD)
    short = ["--max_train_steps", "2", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "2"]

    def torchrun(out, port, *extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                               str(port), SCRIPT, *train_args(tiny_flux_dev_path, out, tmp_path / "reward.py"),
                               *short, *extra], cwd=ROOT, env=env_with(), capture_output=True, text=True, timeout=900)

    # With the unsharded text encoder offloaded between calls (the same numbers; the sharded one, empty off rank 0
    # until the broadcast, must not be moved).
    hybrid = torchrun(tmp_path / "hsdp", 29593, "--shard", "--shard_size", "2", "--offload_text_encoders")
    assert hybrid.returncode == 0, hybrid.stderr[-3000:]
    ddp = torchrun(tmp_path / "ddp", 29595)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    described = [line.split("--shard: ")[1] for line in hybrid.stderr.splitlines() if "--shard: " in line]
    assert described and "sharded over 2 processes, in 2 replicated groups" in described[0], described
    held = int(described[0].rsplit("holds ", 1)[1].split("%")[0])
    assert 40 <= held <= 60, described  # half the denoiser per process: a pair holds one copy
    assert [m["step"] for m in metrics(tmp_path / "hsdp")] == [1, 2]
    for a, b in zip(metrics(tmp_path / "hsdp"), metrics(tmp_path / "ddp"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert len(a["reward_by_process"]) == 4
    assert max_abs_difference(tmp_path / "hsdp" / LORA_WEIGHTS_NAME, tmp_path / "ddp" / LORA_WEIGHTS_NAME) <= 1e-6


PROBE = """
import json, os
from utils.run.sharding import hybrid_shard_size
print("PROBE " + json.dumps({"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
                            "shard_size": hybrid_shard_size()}))
"""


@pytest.mark.slow
def test_the_multinode_fsdp_config_shards_within_each_machine(tmp_path):
    """Two "machines" on localhost, two processes each, started as docs/scaling.md says with
    accelerate_configs/fsdp_multinode.yaml: every process reads a shard size of its machine's 2 processes."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    launchers = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                   str(ROOT / "accelerate_configs" / "fsdp_multinode.yaml"), "--num_machines", "2",
                                   "--num_processes", "4", "--machine_rank", str(rank), "--main_process_ip",
                                   "127.0.0.1", "--main_process_port", "29597", "--mixed_precision", "no", str(probe)],
                                  cwd=ROOT, env=env_with(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in (0, 1)]
    outputs = [launcher.communicate(timeout=600) for launcher in launchers]
    assert all(launcher.returncode == 0 for launcher in launchers), [err[-2000:] for _, err in outputs]
    seen = sorted((json.loads(line.split("PROBE ", 1)[1]) for out, _ in outputs for line in out.splitlines()
                   if line.startswith("PROBE ")), key=lambda r: r["rank"])
    assert seen == [{"rank": rank, "world": 4, "shard_size": 2} for rank in range(4)]
