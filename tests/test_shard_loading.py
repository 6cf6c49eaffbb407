"""`--shard` with the weights read by rank 0 alone (utils/run/empty_models.py, `sharding.load_from_rank0`), on CPU:
two processes over gloo on the tiny FLUX.1-dev pipeline.

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

ROOT = Path(__file__).resolve().parents[1]

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
def test_rank0_alone_reads_the_sharded_weights_and_every_rank_ends_bitwise_as_if_all_had(tiny_flux_dev_path,
                                                                                         tmp_path):
    from utils.families import family_of
    from utils.run.empty_models import empty_sharded_components

    family = family_of(str(tiny_flux_dev_path))
    sharded = empty_sharded_components(family, str(tiny_flux_dev_path), None, torch.float32)
    assert family.denoiser_name in sharded and len(sharded) == 2  # the denoiser and one text encoder
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_flux_dev_path, weightless)
    for name in sharded:
        removed = list((weightless / name).glob("*.safetensors"))
        assert removed
        for file in removed:
            file.unlink()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29591", str(worker), str(tiny_flux_dev_path), str(weightless),
                             str(tmp_path)], cwd=ROOT, env=env_with(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[1]["built_on_meta"] == [sorted(sharded), True] and "built_on_meta" not in ranks[0]
    for r in ranks:
        assert r["names_match"] and r["tensors"] > 20 and r["weights_differ"] == [], r["weights_differ"]
        assert r["non_persistent_buffers"], r  # CLIP's position ids: rebuilt from rank 0's, not left empty
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
