"""CUDA's autocast policy on a CPU trace: the normalisations and softmaxes that CUDA runs in fp32.

The trace runs on CPU, whose autocast keeps group_norm, layer_norm and softmax in bf16/fp16; CUDA's autocast casts
their inputs to fp32 (torch's "ops that autocast to float32" list). Autograd then saves the fp32 copies, and the
norm's output is fp32 until the next matmul or convolution casts it back: in a VAE decoder (a GroupNorm and a
SiLU before each convolution) that makes the saved activations 10 bytes a value instead of 6. `cuda_autocast_policy`
does what CUDA's autocast does for these functions, above autograd, so the trace saves what a GPU saves. It wraps
the `torch.nn.functional` functions themselves, not a mode: gradient checkpointing recomputes in backward, where
a function mode of the forward is not active.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.bfloat16, torch.float16)
# The functions of CUDA's fp32 autocast list these models call while autocast is on.
FP32_FUNCTIONS = ("group_norm", "layer_norm", "softmax", "log_softmax")


def _upcast(value):
    if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION:
        return value.float()
    return value


def _in_fp32(function, device: str):
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        if not torch.is_autocast_enabled(device):
            return function(*args, **kwargs)
        args = tuple(_upcast(a) for a in args)
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        with torch.autocast(device, enabled=False):
            return function(*args, **kwargs)
    return wrapped


@contextlib.contextmanager
def cuda_autocast_policy(device: str) -> Iterator[None]:
    """While inside, and `device`'s autocast is on, the functions of CUDA's fp32 list get fp32 inputs."""
    originals = {name: getattr(F, name) for name in FP32_FUNCTIONS}
    for name, function in originals.items():
        setattr(F, name, _in_fp32(function, device))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(F, name, function)
