"""`--shard`: the frozen model split across processes with FSDP2 (`torch.distributed.fsdp.fully_shard`) while
the LoRA trains, for models whose frozen weights do not fit one GPU whole (FLUX.2-dev, Qwen-Image).

The denoiser is sharded block by block (the family's `shard_block_classes`) and the largest text encoder by its
layers (transformers' `_no_split_modules`): each block all-gathers its weights for its own forward (and again
for its backward) and frees them after, so a process holds 1/N of those weights plus one block whole. The VAE
and the reward model stay whole on every process: they are small next to the transformer, and sharding them
would add two all-gathers per sample for little memory (docs/scaling.md has the sums).

The LoRA is left out of the shards (`ignored_params`): it is millions of weights against billions, so keeping
it whole on every process costs nothing, and every LoRA-facing part of the trainer stays what it is under DDP:
the optimizer steps ordinary tensors, checkpoints and the final file hold the same LoRA file, the cross-rank
digest, the non-finite guards and the preemption read ordinary tensors. The one thing DDP did that is done
here instead is averaging the LoRA's gradients across processes, once per optimiser step
(`ShardedModels.average_gradients`).

Rank 0 alone reads the sharded modules' weights and broadcasts them into the shards (utils/run/empty_models.py
builds them empty elsewhere). Over several machines, `--shard_size` shards within groups of processes and
replicates across them (HSDP, `device_mesh`).

This path runs on whatever device accelerate gives (CUDA over NCCL, CPU over gloo), so it is tested on CPU.
accelerate's own FSDP wrapping is not used: it would shard the LoRA too, it takes a model only together with its
optimizer, and with `cpu=True` it falls back to DDP. An accelerate FSDP config (accelerate_configs/fsdp.yaml)
selects this path, as `--shard` does.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from utils.hub import truthy
from utils.lora import load_lora_into_denoiser, save_lora

# accelerate's name for the optimizer state in a checkpoint: the sharded run's checkpoints hold the same files.
OPTIMIZER_NAME = "optimizer.bin"


def shard_problem(args: Any, family, world_size: int, env: Mapping[str, str] = os.environ) -> str | None:
    """The one line refusing a sharded run that cannot work (None when it can, or the run is not sharded). An
    accelerate FSDP config (ACCELERATE_USE_FSDP in the launcher's environment) turns `args.shard` on."""
    args.shard = bool(args.shard or truthy(env.get("ACCELERATE_USE_FSDP")))
    if getattr(args, "shard_size", None) is None:  # --shard_size wins over the accelerate config
        args.shard_size = hybrid_shard_size(env)
    if args.shard_size is not None and not args.shard:
        return "--shard_size sizes the groups --shard splits the frozen model over; add --shard"
    if not args.shard:
        return None
    source = "--shard" if not truthy(env.get("ACCELERATE_USE_FSDP")) else "the accelerate FSDP config"
    if args.shard_size is not None and (args.shard_size < 2 or world_size % args.shard_size):
        return (f"--shard_size {args.shard_size} must be 2 or more and divide the {world_size} processes (into "
                "groups that each hold the whole model: e.g. one machine's GPUs)")
    if not family.shard_block_classes:
        return (f"{source}: {family.pipeline_class_name} models fit one GPU whole; train them with DDP "
                "(accelerate_configs/multi_gpu.yaml)")
    if world_size < 2:
        return (f"{source} splits the frozen model across processes and this run has one; launch 2 or more "
                "(accelerate launch --config_file accelerate_configs/fsdp.yaml, or torchrun --nproc_per_node N)")
    precision = args.mixed_precision or env.get("ACCELERATE_MIXED_PRECISION")
    refused = (  # (option, refused, what to do instead)
        ("--mixed_precision fp16", precision == "fp16", "use bf16"),  # the loss scaler steps accelerate's optimizer
        ("--quantize_base", args.quantize_base is not None, "shard the bf16 weights instead"),  # 4-bit: not sharded
        ("--compile", args.compile, "leave it out"),  # compiling around FSDP's hooks is not tested here
    )
    for option, bad, instead in refused:
        if bad:
            return f"{option} does not go with {source}: {instead}"
    return None


def hybrid_shard_size(env: Mapping[str, str] = os.environ) -> int | None:
    """The shard size an accelerate FSDP config's `fsdp_sharding_strategy: HYBRID_SHARD` means, as FSDP1's hybrid
    sharding does: one machine's processes (torchrun's LOCAL_WORLD_SIZE); None for any other strategy."""
    if not truthy(env.get("ACCELERATE_USE_FSDP")):
        return None
    strategy = str(env.get("FSDP_SHARDING_STRATEGY", "")).upper()
    if strategy in ("HYBRID_SHARD", "4"):  # accelerate takes a strategy's name or its number (FSDP1's enum)
        return int(env.get("LOCAL_WORLD_SIZE", 1))
    return None


def device_mesh(device: torch.device, shard_size: int | None = None):
    """The mesh the frozen modules are sharded over: 1-D over all processes, or with `shard_size` 2-D (HSDP): each
    group of `shard_size` consecutive ranks (one machine's, as launchers number them) holds one copy of the model,
    sharded, and the groups replicate it. The LoRA's gradients are averaged over all processes either way."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if shard_size is None or shard_size == world:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def largest(modules: Iterable[torch.nn.Module]) -> torch.nn.Module | None:
    """The module with the most weights (the text encoder worth sharding: T5-XXL, Mistral, Qwen2.5-VL)."""
    return max(modules, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def modules_to_shard(family) -> list[torch.nn.Module]:
    """The loaded modules `shard_models` shards: the denoiser and the largest text encoder. They are left where
    they were loaded (the CPU): `fully_shard` moves each block to the device as it shards it, so no device ever
    holds one of them whole."""
    encoder = largest(family.text_encoders)
    return [family.denoiser, *([encoder] if encoder is not None else [])]


def shard_module(module: torch.nn.Module, block_classes: Sequence[str], mesh, ignored: set[torch.nn.Parameter],
                 reshard_after_forward: bool = True) -> int:
    """`fully_shard` every submodule whose class is named in `block_classes`, then `module` itself (the weights
    outside the blocks). `ignored` parameters stay whole and where they are. Returns how many blocks."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in module.modules() if type(m).__name__ in block_classes and m is not module]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    return len(blocks)


@dataclass
class ShardedModels:
    """What the training loop needs of a sharded run: the sharded denoiser and the (whole) LoRA parameters."""

    denoiser: torch.nn.Module
    lora_params: Sequence[torch.nn.Parameter]
    blocks: int  # denoiser blocks sharded
    mesh_shape: tuple[int, ...] = ()  # (processes,), or (copies, processes per copy) with hybrid sharding

    def describe(self) -> str:
        """What the log says of the sharding: the mesh, and the share of the denoiser's weights this process holds
        (about 1 / the processes a copy is split over)."""
        from torch.distributed.tensor import DTensor

        held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in self.denoiser.parameters())
        copies, per_copy = self.mesh_shape if len(self.mesh_shape) == 2 else (1, self.mesh_shape[0])
        return (f"{self.blocks} denoiser blocks sharded over {per_copy} processes, in {copies} replicated "
                f"group{'s' if copies > 1 else ''}; this process holds "
                f"{held / sum(p.numel() for p in self.denoiser.parameters()):.0%} of the denoiser's weights")

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Every process's LoRA gradients replaced by their mean over the processes, as DDP leaves them (divided
        by the process count before the sum, as DDP's reducer does): one all-reduce of one flat buffer."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.lora_params]
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(dist.get_world_size())
        dist.all_reduce(flat)
        for p, g in zip(self.lora_params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()


def reshard_after_forward(accelerator) -> bool:
    """False only under an accelerate FSDP config with `fsdp_reshard_after_forward: false` (each gathered block then
    stays whole from its forward to its backward: fewer all-gathers, more memory)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)  # the state raises AttributeError when it has none
    return getattr(plugin, "reshard_after_forward", True) is not False


def _tensors(module: torch.nn.Module, ignored: set[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    # Parameters (a tied one once) and buffers, non-persistent ones included: those are in no state dict, and a
    # module built on the meta device has them empty.
    return {name: t for name, t in [*module.named_parameters(), *module.named_buffers()] if t not in ignored}


@torch.no_grad()
def agree_with_rank0(modules: Sequence[torch.nn.Module], ignored: set[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """Before `fully_shard`: rank 0's tensors of each module (name -> its whole tensor, kept for
    `load_from_rank0`); on the other ranks, whose modules are built on the meta device, rank 0's (shape, dtype) of
    each, their parameters cast to rank 0's dtypes (a model can keep some modules in fp32 when loaded). A module
    built otherwise than rank 0's loaded one is a RuntimeError."""
    whole = [{name: t.detach() for name, t in _tensors(m, ignored).items()} for m in modules]
    layouts = [[{name: (t.shape, t.dtype) for name, t in tensors.items()} for tensors in whole]]
    dist.broadcast_object_list(layouts, src=0)
    if dist.get_rank() == 0:
        return whole
    for module, mine, theirs in zip(modules, whole, layouts[0], strict=True):
        if differ := sorted(set(mine).symmetric_difference(theirs)
                            | {name for name in mine.keys() & theirs.keys() if mine[name].shape != theirs[name][0]}):
            raise RuntimeError(f"{type(module).__name__} built empty differs from rank 0's loaded one at {differ[0]}")
        for name, p in module.named_parameters():
            if name in theirs and p.dtype != theirs[name][1]:
                p.data = p.data.to(theirs[name][1])
    return layouts[0]


@torch.no_grad()
def load_from_rank0(modules: Sequence[torch.nn.Module], whole: Sequence[dict[str, Any]],
                    device: torch.device) -> None:
    """After `fully_shard`: every tensor of `modules` that `agree_with_rank0` listed broadcast from rank 0, one at a
    time, each rank keeping its shard of a sharded parameter (`distribute_tensor`, no further communication) and
    the whole of a buffer. The other ranks' modules are first given (empty) memory on `device`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    rank0 = dist.get_rank() == 0
    for module, tensors in zip(modules, whole, strict=True):
        if not rank0:  # swapped, not replaced: the LoRA's parameters are the optimizer's; FSDP re-pads its shards
            swap = torch.__future__.get_swap_module_params_on_conversion()
            torch.__future__.set_swap_module_params_on_conversion(True)
            try:
                module.to_empty(device=device)
            finally:
                torch.__future__.set_swap_module_params_on_conversion(swap)
        for name, value in tensors.items():
            full = value.to(device) if rank0 else torch.empty(value[0], dtype=value[1], device=device)
            dist.broadcast(full, src=0)
            if rank0:  # its shards were cut from these very tensors
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            current = owner._parameters.get(leaf)
            if isinstance(current, DTensor):
                shard = distribute_tensor(full, current.device_mesh, current.placements, src_data_rank=None)
                current.to_local().copy_(shard.to_local())
            elif current is not None:
                current.copy_(full)
            else:
                owner._buffers[leaf] = full  # in rank 0's dtype; registered (and persistent or not) as built


def shard_models(family, lora_params: Sequence[torch.nn.Parameter], device: torch.device,
                 reshard_after_forward: bool = True, from_rank0: bool = False,
                 shard_size: int | None = None) -> ShardedModels:
    """Shard the family's denoiser by its `shard_block_classes` and its largest text encoder by its
    `_no_split_modules` onto `device` over all processes, or over groups of `shard_size` (`device_mesh`), the LoRA
    left whole. `from_rank0`: only rank 0 loaded those modules' weights, the other ranks built them on the meta
    device (utils/run/empty_models.py); rank 0 broadcasts them into the shards."""
    mesh = device_mesh(device, shard_size)
    ignored = set(lora_params)
    modules = modules_to_shard(family)
    whole = agree_with_rank0(modules, ignored) if from_rank0 else None
    denoiser, *encoders = modules
    blocks = shard_module(denoiser, family.shard_block_classes, mesh, ignored, reshard_after_forward)
    for encoder in encoders:
        shard_module(encoder, getattr(encoder, "_no_split_modules", None) or (), mesh, set(), reshard_after_forward)
    if whole is not None:
        load_from_rank0(modules, whole, device)
    for p in lora_params:  # added on the CPU (or the meta device) with the rest of the denoiser; it stays whole
        p.data = p.data.to(device)
        dist.broadcast(p.data, src=0)  # every process starts from rank 0's LoRA, as DDP's prepare makes it
    return ShardedModels(denoiser=denoiser, lora_params=lora_params, blocks=blocks, mesh_shape=tuple(mesh.shape))


def register_checkpoint_hooks(accelerator, family, sharded: ShardedModels, optimizer: torch.optim.Optimizer) -> None:
    """accelerate's save/load hooks for a sharded run, whose denoiser and optimizer accelerate does not hold: a
    checkpoint gets the LoRA file and `optimizer.bin` as under DDP (both whole: the LoRA is never sharded),
    written by the main process; accelerate adds the LR scheduler and every rank's RNG state."""

    def save_hook(models, weights, output_dir):
        save_lora(sharded.denoiser, output_dir, family, is_main_process=accelerator.is_main_process)
        if accelerator.is_main_process:
            torch.save(optimizer.state_dict(), Path(output_dir) / OPTIMIZER_NAME)

    def load_hook(models, input_dir):
        load_lora_into_denoiser(sharded.denoiser, input_dir, family)
        state = torch.load(Path(input_dir) / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)  # moves the moments to the LoRA's device

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
