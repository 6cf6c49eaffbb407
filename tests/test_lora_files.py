"""utils/lora/files.py: the same LoRA is the same bytes, whatever the process's string-hash salt."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # what lora_fixtures.save_random_lora targets
SAVE = ("import sys; sys.path.insert(0, 'tests'); from lora_fixtures import save_random_lora; "
        "save_random_lora(sys.argv[1], sys.argv[2]); print(list(set(sys.argv[3:])))")


def save_in_processes(model, out_dir, hash_seeds) -> list[str]:
    """Save the random LoRA (seed 1) once in each of fresh processes started together, one per string-hash seed, into
    `out_dir/run<seed>`; returns the order each process iterates the targets' set."""
    started = [subprocess.Popen([sys.executable, "-c", SAVE, str(model), str(out_dir / f"run{seed}"), *TARGETS],
                                cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                               "PYTHONHASHSEED": str(seed)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in hash_seeds]
    orders = []
    for process in started:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        orders.append(stdout.strip().splitlines()[-1])
    return orders


@pytest.mark.slow
def test_identical_saves_write_the_same_bytes(tiny_sd_path, tmp_path):
    """Four processes: PEFT's target set and safetensors' metadata map each come out in a per-process order, so
    without sorting both, four saves all agreeing by chance is unlikely (1 in 8 for the metadata's two keys alone)."""
    seeds = (0, 1, 2, 3)
    orders = save_in_processes(tiny_sd_path, tmp_path, seeds)
    assert len(set(orders)) > 1  # the processes hold the target set in different orders
    digests = {hashlib.sha256((tmp_path / f"run{seed}" / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()
               for seed in seeds}
    assert len(digests) == 1
    with safe_open(str(tmp_path / "run0" / "pytorch_lora_weights.safetensors"), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])  # diffusers' key, the config's keys prefixed
    assert config["unet.target_modules"] == sorted(TARGETS)
