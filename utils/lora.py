"""PEFT LoRA on the denoiser (a UNet or a transformer): add adapters, save them in diffusers' format, load them back.

The file format is the model family's (`utils.family`): the pipeline class's `save_lora_weights`, with the
key style of diffusers' own LoRA scripts for that family. The saved file carries the adapter's LoraConfig as
safetensors metadata, so `lora_alpha != rank` (and target modules) survive `pipe.load_lora_weights(...)`;
without it diffusers assumes alpha = rank.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import _collate_lora_metadata
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, set_peft_model_state_dict

from utils.errors import EXIT_RUN_FAILED, UserError

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# The attention projections every family's denoiser has (the `attention` preset of the UNet families);
# `utils.family` holds each family's presets (`--lora_target_modules attention`, `attention+ff`).
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


def expand_target_modules(names: Sequence[str], presets: Mapping[str, Sequence[str]]) -> list[str]:
    """Presets (e.g. `attention`, `attention+ff`) expanded to module names; other names kept, in order."""
    out: list[str] = []
    for name in names:
        for module in presets.get(name, (name,)):
            if module not in out:
                out.append(module)
    return out


def add_lora(
    denoiser: torch.nn.Module,
    rank: int,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
) -> list[torch.nn.Parameter]:
    """Freeze the denoiser, add a LoRA adapter named "default" on the modules named `target_modules`
    (presets expanded: `ModelFamily.target_modules`), and return its (fp32) parameters."""
    check_lora_targets(denoiser, target_modules)
    denoiser.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha if lora_alpha is not None else rank,
        lora_dropout=lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    denoiser.add_adapter(config)
    _grad_only_dropout(denoiser)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    # LoRA weights are the only thing optimised: keep them in fp32 even when the denoiser is bf16/fp16 (or
    # 4-bit, whose LoRA layers PEFT creates in the compute dtype), otherwise small updates round away.
    for p in params:
        p.data = p.data.float()
    return params


class GradOnlyDropout(torch.nn.Dropout):
    """LoRA dropout that acts in the calls autograd records, and in no other, whatever the train/eval mode.

    Dropout regularises the LoRA's gradient, so it belongs to the rollout's graded calls; every no-grad
    call (the step prefix, the adapters-off reference, validation and evaluation renders) must be the
    model itself. The trainer keeps the denoiser in eval mode throughout. Switching dropout modules on only
    around the graded call would not do: gradient checkpointing recomputes that call during backward,
    after the rollout has returned, and a recompute without the forward's dropout fails (or, were it
    allowed, differentiates another function). The recompute runs with grad enabled and the forward's
    RNG state, so here it draws the same masks.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, self.p, torch.is_grad_enabled(), self.inplace)


def _grad_only_dropout(denoiser: torch.nn.Module) -> None:
    """Replace PEFT's LoRA dropout (an nn.Dropout per adapter in each layer's `lora_dropout` ModuleDict,
    created in training mode) with GradOnlyDropout, in the denoiser's train/eval mode."""
    for layer in list(denoiser.modules()):
        dropouts = getattr(layer, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for adapter, module in list(dropouts.items()):
            if isinstance(module, torch.nn.Dropout) and not isinstance(module, GradOnlyDropout):
                dropouts[adapter] = GradOnlyDropout(module.p, module.inplace).train(denoiser.training)


def unmatched_targets(module_names: Iterable[str], targets: Iterable[str]) -> list[str]:
    """Targets that name no module, with PEFT's rule for a list of names (the name or its last parts)."""
    names = list(module_names)
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def check_lora_targets(denoiser: torch.nn.Module, targets: Iterable[str]) -> None:
    """UserError naming the targets no module of the denoiser matches, with its commonest layer names as a
    hint (PEFT's own error lists every module)."""
    missing = unmatched_targets((n for n, _ in denoiser.named_modules()), targets)
    if not missing:
        return
    layers: dict[str, int] = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            short = ".".join(name.split(".")[-2:]) if name.split(".")[-1].isdigit() else name.split(".")[-1]
            layers[short] = layers.get(short, 0) + 1
    examples = ", ".join(sorted(layers, key=lambda k: -layers[k])[:10])
    raise UserError(f"--lora_target_modules: no {type(denoiser).__name__} module is named {' '.join(missing)} "
                    f"(presets: attention, attention+ff; layer names include {examples})")


@contextmanager
def adapters_disabled(denoiser: torch.nn.Module):
    """Run the frozen base model: the same denoiser with its LoRA switched off (with `--quantize_base`, the
    quantized base weights).

    PEFT's disable also sets requires_grad=False on the LoRA weights, so a backward() taken before
    re-enabling would silently give them no gradient; the `finally` always switches them back on.
    """
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


def lora_state_dict(denoiser: torch.nn.Module, family) -> dict[str, torch.Tensor]:
    """The adapter weights in the key format of `family`'s LoRA files (what `load_lora_weights` expects)."""
    return family.lora_layers(denoiser)


def inference_metadata(denoiser: torch.nn.Module, family) -> dict[str, dict]:
    """The adapter's LoraConfig as diffusers writes it beside the weights, with no dropout: a loaded
    adapter's dropout is built in training mode and `pipe(...)` never switches it off, so a recorded
    `lora_dropout` would perturb every image rendered with the LoRA. Dropout is a training setting
    (the run's config and model card keep it)."""
    return {key: {**config, "lora_dropout": 0.0}
            for key, config in _collate_lora_metadata({family.denoiser_name: denoiser}).items()}


class LoraWriteError(UserError, OSError):
    """The LoRA file could not be written (disk full, permissions); the one already there is intact."""

    exit_code = EXIT_RUN_FAILED


def save_lora(denoiser: torch.nn.Module, output_dir: str | os.PathLike, family, is_main_process: bool = True) -> Path:
    """Write `pytorch_lora_weights.safetensors` (+ LoRA metadata) atomically into `output_dir`, in the
    format of `family`'s pipeline (a `utils.family.ModelFamily` class or instance).

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


# ---------------------------------------------------------------------------------------- kohya export

KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"


def _lora_alpha_for(module: str, metadata: dict, rank: int, component: str = "unet") -> float:
    """The module's lora_alpha from diffusers' LoRA metadata (alpha_pattern first, as PEFT resolves it);
    without metadata, diffusers loads alpha = rank, and so must the export."""
    import re

    alpha_pattern = metadata.get(f"{component}.alpha_pattern") or {}
    for pattern, alpha in alpha_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    alpha = metadata.get(f"{component}.lora_alpha")
    return float(alpha) if alpha is not None else float(rank)


def _read_lora_file(lora_file: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers LoRA file's tensors and its LoRA metadata (diffusers' `<component>.<field>` keys)."""
    import json

    from safetensors import safe_open

    with safe_open(str(lora_file), framework="pt") as f:
        state_dict = {k: f.get_tensor(k) for k in f.keys()}
        metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    return state_dict, metadata


def kohya_state_dict(lora_file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A diffusers LoRA file (as `save_lora` writes) in kohya's format, the one AUTOMATIC1111 and
    ComfyUI load: `lora_unet_<module>.lora_down/lora_up.weight` plus a `.alpha` per module.

    The keys come from diffusers' `convert_state_dict_to_kohya`; that function writes alpha = rank, so
    each `.alpha` is then set to the adapter's real lora_alpha (read from the file's LoRA metadata),
    or the LoRA would act at rank/alpha times its trained strength."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    state_dict, metadata = _read_lora_file(lora_file)
    if not state_dict or not all(k.startswith("unet.") for k in state_dict):
        raise ValueError(f"{lora_file} is not a draftplus UNet LoRA (expected only 'unet.' keys)")
    peft_state_dict = convert_unet_state_dict_to_peft(state_dict)
    kohya = convert_state_dict_to_kohya(peft_state_dict)
    for key in [k for k in kohya if k.endswith(".alpha")]:
        module = key.removesuffix(".alpha")
        peft_module = next(k for k in peft_state_dict
                           if k.endswith(".lora_A.weight") and k.removesuffix(".lora_A.weight").replace(".", "_")
                           == module.replace("lora_unet", "unet", 1))
        rank = peft_state_dict[peft_module].shape[0]
        alpha = _lora_alpha_for(peft_module.removeprefix("unet.").removesuffix(".lora_A.weight"), metadata, rank)
        kohya[key] = torch.tensor(alpha, dtype=torch.float32)
    return {k: v.contiguous() for k, v in kohya.items()}


def _lora_file_of(lora: str | os.PathLike) -> Path:
    lora = Path(lora)
    lora_file = lora / LORA_WEIGHTS_NAME if lora.is_dir() else lora
    if not lora_file.is_file():
        raise FileNotFoundError(f"no {LORA_WEIGHTS_NAME} in {lora}")
    return lora_file


def _save_atomically(state_dict: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file under a temporary name beside `target`, then rename it over `target`."""
    from safetensors.torch import save_file

    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".tmp-export-", suffix=".safetensors",
                                     delete=False) as tmp:
        pass
    try:
        save_file(state_dict, tmp.name, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp.name, 0o666 & ~umask)
        os.replace(tmp.name, target)
    finally:
        if os.path.exists(tmp.name):
            os.unlink(tmp.name)
    return target


def export_kohya(lora: str | os.PathLike, output_file: str | os.PathLike | None = None) -> Path:
    """Write the kohya/webui version of a draftplus UNet LoRA (an output dir or its .safetensors file) as
    `pytorch_lora_weights_kohya.safetensors` next to it (or to `output_file`), atomically."""
    lora_file = _lora_file_of(lora)
    target = Path(output_file) if output_file is not None else lora_file.with_name(KOHYA_WEIGHTS_NAME)
    return _save_atomically(kohya_state_dict(lora_file), target,
                            {"format": "pt", "ss_network_module": "networks.lora", "ss_source": "draftplus"})


# ---------------------------------------------------------------------------------------- ComfyUI export
# (flow transformers)

COMFYUI_WEIGHTS_NAME = "pytorch_lora_weights_comfyui.safetensors"


def comfyui_state_dict(lora_file: str | os.PathLike, component: str = "transformer") -> dict[str, torch.Tensor]:
    """A diffusers transformer LoRA file with one `<component>.<module>.alpha` tensor per module added: what
    ComfyUI's FLUX and SD3 loaders map completely at the exact alpha/rank scale (they read no safetensors
    metadata, and without the tensor take alpha = rank)."""
    state_dict, metadata = _read_lora_file(lora_file)
    downs = [k for k in state_dict if k.endswith(".lora_A.weight")]
    if not downs or not all(k.startswith(component + ".") for k in state_dict):
        raise ValueError(f"{lora_file} is not a draftplus {component} LoRA (expected only '{component}.' keys)")
    out = dict(state_dict)
    for key in downs:
        module = key.removesuffix(".lora_A.weight")
        alpha = _lora_alpha_for(module.removeprefix(component + "."), metadata, state_dict[key].shape[0], component)
        out[module + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return {k: v.contiguous() for k, v in out.items()}


def export_comfyui(lora: str | os.PathLike, output_file: str | os.PathLike | None = None,
                   component: str = "transformer") -> Path:
    """Write the ComfyUI version of a draftplus transformer LoRA (an output dir or its .safetensors file) as
    `pytorch_lora_weights_comfyui.safetensors` next to it (or to `output_file`), atomically."""
    lora_file = _lora_file_of(lora)
    target = Path(output_file) if output_file is not None else lora_file.with_name(COMFYUI_WEIGHTS_NAME)
    return _save_atomically(comfyui_state_dict(lora_file, component), target, {"format": "pt"})


def export_for_ui(lora: str | os.PathLike, output_file: str | os.PathLike | None = None) -> Path:
    """Write the file ComfyUI loads (and, for SD/SDXL, AUTOMATIC1111) for a draftplus LoRA of any family, in the
    format its keys call for: a transformer LoRA (SD3, FLUX) as `export_comfyui`, a UNet LoRA as `export_kohya`."""
    from safetensors import safe_open

    lora_file = _lora_file_of(lora)
    with safe_open(str(lora_file), framework="pt") as f:
        keys = list(f.keys())
    if keys and all(k.startswith("transformer.") for k in keys):
        return export_comfyui(lora_file, output_file)
    return export_kohya(lora_file, output_file)
