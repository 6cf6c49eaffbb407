"""LoRA files: their names, and saving and loading the diffusers-format file atomically.

The file format is the model family's (`utils.families`): the pipeline class's `save_lora_weights`, with the
key style of diffusers' own LoRA scripts for that family. The saved file carries the adapter's LoraConfig as
safetensors metadata, so `lora_alpha != rank` (and target modules) survive `pipe.load_lora_weights(...)`;
without it diffusers assumes alpha = rank.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from diffusers.training_utils import _collate_lora_metadata
from peft import set_peft_model_state_dict

from utils.errors import EXIT_RUN_FAILED, UserError

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"  # UNet families: kohya's keys (ComfyUI, A1111)
COMFYUI_WEIGHTS_NAME = "pytorch_lora_weights_comfyui.safetensors"  # transformers: diffusers' keys + alpha tensors


def lora_state_dict(denoiser: torch.nn.Module, family) -> dict[str, torch.Tensor]:
    """The adapter weights in the key format of `family`'s LoRA files (what `load_lora_weights` expects)."""
    return family.lora_layers(denoiser)


def inference_metadata(denoiser: torch.nn.Module, family) -> dict[str, dict]:
    """The adapter's LoraConfig as diffusers writes it beside the weights, with no dropout: a loaded
    adapter's dropout is built in training mode and `pipe(...)` never switches it off, so a recorded
    `lora_dropout` would perturb every image rendered with the LoRA. Dropout is a training setting
    (the run's config and model card keep it).

    PEFT holds `target_modules` as a set, whose order follows the string hash, salted per process: written
    as found, two identical runs would write different bytes (and the evaluator's lora_sha256 would take the
    same LoRA for a new one). Sets are written sorted."""
    return {key: {**{k: sorted(v, key=str) if isinstance(v, set | frozenset) else v for k, v in config.items()},
                  "lora_dropout": 0.0}
            for key, config in _collate_lora_metadata({family.denoiser_name: denoiser}).items()}


class LoraWriteError(UserError, OSError):
    """The LoRA file could not be written (disk full, permissions); the one already there is intact."""

    exit_code = EXIT_RUN_FAILED


def save_lora(denoiser: torch.nn.Module, output_dir: str | os.PathLike, family, is_main_process: bool = True) -> Path:
    """Write `pytorch_lora_weights.safetensors` (+ LoRA metadata) atomically into `output_dir`, in the
    format of `family`'s pipeline (a `utils.families.ModelFamily` class or instance).

    The file is written next to its destination and then renamed over it, so an interrupted or
    failed save never leaves a truncated LoRA where a good one was; a failure raises LoraWriteError
    saying what failed.
    """
    output_dir = Path(output_dir)
    target = output_dir / LORA_WEIGHTS_NAME
    if not is_main_process:
        return target
    state_dict = {k: v.detach().to("cpu", torch.float32).contiguous()
                  for k, v in lora_state_dict(denoiser, family).items()}
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-lora-") as tmp:
            family.save_lora_weights(tmp, state_dict, **inference_metadata(denoiser, family))
            written = os.path.join(tmp, LORA_WEIGHTS_NAME)
            sort_metadata(written)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(written, 0o666 & ~umask)  # files in a private temp dir are created 0600
            os.replace(written, target)
    except Exception as e:  # OSError, or safetensors' own error type for a failed write
        kept = "the LoRA already there is intact" if target.exists() else "no LoRA was there before"
        raise LoraWriteError(f"could not write {target} ({type(e).__name__}: {e}); {kept}") from e
    return target


def load_lora_into_denoiser(denoiser: torch.nn.Module, lora_dir: str | os.PathLike, family) -> None:
    """Load a saved LoRA into the denoiser's existing "default" adapter (used to resume training)."""
    state_dict = family.peft_lora_state_dict(family.lora_state_dict(lora_dir))
    result = set_peft_model_state_dict(denoiser, state_dict, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA in {lora_dir} does not match the denoiser's adapter: unexpected keys {unexpected[:3]}")


def read_lora_file(lora_file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers LoRA file's tensors and its LoRA metadata (diffusers' `<component>.<field>` keys)."""

    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as f:
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    return state_dict, metadata


def lora_file_of(lora: str | os.PathLike) -> Path:
    lora = Path(lora)
    lora_file = lora / LORA_WEIGHTS_NAME if lora.is_dir() else lora
    if not lora_file.is_file():
        raise FileNotFoundError(f"no {LORA_WEIGHTS_NAME} in {lora}")
    return lora_file


def sort_metadata(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file with its metadata's keys sorted. safetensors writes the metadata from a hash map,
    in an order that varies from process to process, so the same LoRA would be other bytes (and another sha256)
    in another run; the tensors' entries and data stay as written."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = f.read()
    if not header.get("__metadata__"):
        return
    header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
              **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def save_atomically(state_dict: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file under a temporary name beside `target`, then rename it over `target`."""
    from safetensors.torch import save_file

    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-export-", suffix=".safetensors",
                                     delete=False) as tmp:
        pass
    try:
        save_file(state_dict, tmp.name, metadata=metadata)
        sort_metadata(tmp.name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)
        os.replace(tmp.name, target)
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return target


