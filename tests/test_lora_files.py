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


def save_in_a_process(model, out, hash_seed: int) -> list[str]:
    """Save the random LoRA (seed 1) in a fresh process; returns the order that process iterates the targets' set."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": str(hash_seed)}
    done = subprocess.run([sys.executable, "-c", SAVE, str(model), str(out), *TARGETS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_identical_saves_write_the_same_bytes(tiny_sd_path, tmp_path):
    """Four processes: PEFT's target set and safetensors' metadata map each come out in a per-process order, so
    without sorting both, four saves all agreeing by chance is unlikely (1 in 8 for the metadata's two keys alone)."""
    seeds = (0, 1, 2, 3)
    orders = [save_in_a_process(tiny_sd_path, tmp_path / f"run{seed}", seed) for seed in seeds]
    assert len(set(orders)) > 1  # the processes hold the target set in different orders
    digests = {hashlib.sha256((tmp_path / f"run{seed}" / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest()
               for seed in seeds}
    assert len(digests) == 1
    with safe_open(str(tmp_path / "run0" / "pytorch_lora_weights.safetensors"), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])  # diffusers' key, the config's keys prefixed
    assert config["unet.target_modules"] == sorted(TARGETS)
