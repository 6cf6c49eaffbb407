"""`--compile`: the rollout's no-grad denoiser calls through torch.compile, replayed as CUDA graphs on GPUs.

DRaFT+ spends nearly all of its time in the T-K no-grad steps of the rollout (87% of the kernel time of
an SD1.5-size sample), and on a fast GPU those steps are launch-bound: the host issues ~1,200-1,750
small kernels per UNet call with LoRA layers. `mode="reduce-overhead"` fuses them (inductor) and
replays each call as one CUDA graph.

What is compiled, and how:
- A *wrapper* around the raw (unwrapped, LoRA-carrying) denoiser: `torch.compile(denoiser)` returns an
  OptimizedModule around the module, which itself stays eager. The graded step(s), which need autograd,
  keep calling the eager module (through DDP where there is one), on the very same weights.
- The adapters-on prefix and the adapters-off reference are two graphs of that one wrapper. PEFT's
  `disable_adapters` flips module attributes (and the LoRA weights' requires_grad) that dynamo guards
  on: the first call in each state compiles a graph, later calls are routed between the two cached
  graphs by their guards, without recompiling (tests/test_compile.py holds that).
- Outputs are cloned when CUDA graphs are on: a graph's output buffer is overwritten by its next replay,
  and the rollout keeps predictions across calls (eps_ref; PLMS and DPM-Solver keep past outputs). Each
  call starts a new graph "step" (`cudagraph_mark_step_begin`), since no call's output is read by a later
  replay.
- Not `fuse_qkv_projections`: fused projections bypass the LoRA on to_q/to_k/to_v (diffusers #11903).

Also under --compile: peft's `disable_input_dtype_casting` (LoRA layers skip casting their input to the
fp32 adapter dtype; under autocast the matmul casts to bf16/fp16 anyway, so the result is bitwise the same,
with ~500 fewer ops per UNet call), and channels_last weights for the denoiser and the VAE on CUDA.

Every family: the UNets (SD 1.x/2.x, SDXL) and the flow transformers (SD3/SD3.5, FLUX.1), whose calls take
keywords (`hidden_states=...`) and whose latents are passed as they come (see `CompiledDenoiser.__call__`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch._dynamo

# Debugging knob: another torch.compile backend for the no-grad calls, e.g. `aot_eager` (no inductor, fast to
# compile: checks that tracing is right) or `eager` (dynamo only).
BACKEND_ENV = "DRAFTPLUS_COMPILE_BACKEND"
CUDA_MODE = "reduce-overhead"  # inductor + CUDA graphs


def compile_unsupported_reason() -> str | None:
    """Why torch.compile cannot run here, in one line; None when it can."""
    if not hasattr(torch, "compile") or not hasattr(torch, "compiler"):
        return f"--compile needs torch.compile (torch >= 2.1); this is torch {torch.__version__}"
    if not torch._dynamo.is_dynamo_supported():
        return f"--compile: torch.compile does not support Python {sys.version.split()[0]} with torch {torch.__version__}"
    import peft.helpers

    if not hasattr(peft.helpers, "disable_input_dtype_casting"):
        return (f"--compile needs peft.helpers.disable_input_dtype_casting, which peft {peft.__version__} lacks "
                "(requirements.txt pins one that has it)")
    return None


def default_compile_options(device: torch.device, backend: str | None = None) -> dict[str, Any]:
    """inductor with CUDA graphs on CUDA; plain inductor elsewhere; `backend` (or $DRAFTPLUS_COMPILE_BACKEND)
    replaces inductor."""
    backend = backend or os.environ.get(BACKEND_ENV) or "inductor"
    options: dict[str, Any] = {"backend": backend}
    if backend == "inductor" and device.type == "cuda":
        options["mode"] = CUDA_MODE
    return options


class CompiledDenoiser:
    """The denoiser's call signature, for calls without autograd (the rollout's prefix and reference pass).

    `fullgraph=True`: a graph break would split a step into pieces with eager gaps. `dynamic=False`: a
    training run has one latent shape, and static shapes give the fastest kernels; a second shape (e.g. a
    different batch size) compiles its own graph.
    """

    def __init__(self, denoiser: torch.nn.Module, *, backend: str | None = None, mode: str | None = None) -> None:
        options = default_compile_options(denoiser.device, backend)
        if mode is not None:
            options["mode"] = mode
        self.denoiser = denoiser
        self.options = options
        self.cuda_graphs = options.get("mode") in ("reduce-overhead", "max-autotune") and denoiser.device.type == "cuda"
        self.compiled = torch.compile(denoiser, fullgraph=True, dynamic=False, **options)
        self.stack = contextlib.ExitStack()  # module settings that last as long as this object (see close())

    def close(self) -> None:
        """Undo the module settings entered on `stack` (the compiled graphs stay cached)."""
        self.stack.close()

    def __call__(self, *args, **kwargs):
        if args:  # a UNet, called as the UNet families call it: `sample` first
            args = (self._autocast_input(args[0]), *args[1:])
        # The transformers are called with keywords; their latents pass as they come: FLUX casts its timestep to
        # the dtype of `hidden_states`, so casting them would change the numbers (an fp32 first latent and the
        # bf16 latents of later steps then make two graphs per adapter state).
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.compiled(*args, **kwargs)
        if self.cuda_graphs:  # the graph's output buffer belongs to its next replay
            out = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, out)
        return out

    @staticmethod
    def _autocast_input(sample: torch.Tensor) -> torch.Tensor:
        device_type = sample.device.type
        if torch.is_autocast_enabled(device_type) and sample.dtype == torch.float32:
            # Under autocast every use of a UNet's `sample` (conv_in, and the dtype of the time embedding, which
            # feeds a Linear) is cast to the autocast dtype anyway: casting first gives the same numbers, and one
            # graph where an fp32 first latent and the bf16 latents later samplers return (Euler) would make two.
            return sample.to(torch.get_autocast_dtype(device_type))
        return sample

    def __repr__(self) -> str:
        return f"CompiledDenoiser({type(self.denoiser).__name__}, {self.options})"


def compile_no_grad_denoiser(denoiser: torch.nn.Module, vae: torch.nn.Module | None = None, *,
                             backend: str | None = None, mode: str | None = None) -> CompiledDenoiser:
    """Prepare the LoRA denoiser (and the VAE) for fast sampling and return the compiled no-grad callable.

    Changes the modules in place: channels_last weights on CUDA, and the LoRA layers' input casting switched
    off (peft's own `disable_input_dtype_casting`, held open by the returned object: `close()` restores it).
    Call after the denoiser has its final device, dtype and adapters: a CUDA graph holds the weights' addresses.
    """
    from peft.helpers import disable_input_dtype_casting

    if denoiser.device.type == "cuda":
        denoiser.to(memory_format=torch.channels_last)
        if vae is not None:
            vae.to(memory_format=torch.channels_last)
    compiled = CompiledDenoiser(denoiser, backend=backend, mode=mode)
    compiled.stack.enter_context(disable_input_dtype_casting(denoiser))
    return compiled


# ---------------------------------------------------------------------------------- recompile checks


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process (first compiles and recompiles alike)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def cudagraph_skip_count() -> int:
    """Compiled graphs that inductor ran without CUDA graphs (each one logs why)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


class RecompileError(RuntimeError):
    """A timed or warmed-up loop compiled a graph it should have found in the cache."""


@contextlib.contextmanager
def no_new_graphs(what: str = "this loop") -> Iterator[None]:
    """Fail if anything compiles inside: a recompile (dynamo's `error_on_recompile`) or a graph compiled for
    the first time (the graph counter) means the warm-up did not cover what is being timed."""
    before = compiled_graph_count()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            yield
    except torch._dynamo.exc.RecompileError as e:
        raise RecompileError(f"{what} recompiled after warm-up: {e}") from e
    compiled = compiled_graph_count() - before
    if compiled:
        raise RecompileError(f"{what} compiled {compiled} new graph(s) after warm-up")
