"""CUDA's autocast policy on a CPU trace: the normalisations and softmaxes that CUDA runs in fp32.

The trace runs on CPU, whose autocast keeps group_norm, layer_norm and softmax in bf16/fp16; CUDA's autocast casts
their inputs to fp32 (torch's "ops that autocast to float32" list). Autograd then saves the fp32 copies, and the
norm's output is fp32 until the next matmul or convolution casts it back: in a VAE decoder (a GroupNorm and a
SiLU before each convolution) that makes the saved activations 10 bytes a value instead of 6. `CudaAutocastPolicy`
does what CUDA's autocast does for these functions, above autograd, so the trace saves what a GPU saves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

LOW_PRECISION = (torch.bfloat16, torch.float16)
# The functions of CUDA's fp32 autocast list these models call while autocast is on (their tensor arguments).
FP32_FUNCTIONS = {F.group_norm, F.layer_norm, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
                  torch.Tensor.softmax, torch.Tensor.log_softmax}


def _upcast(value):
    if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION:
        return value.float()
    return value


class CudaAutocastPolicy(TorchFunctionMode):
    """While `device`'s autocast is on, the functions of CUDA's fp32 list get fp32 inputs (see the module's doc)."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FP32_FUNCTIONS and torch.is_autocast_enabled(self.device):
            args = tuple(_upcast(a) for a in args)
            kwargs = {k: _upcast(v) for k, v in kwargs.items() if k != "dtype"}
            with torch.autocast(self.device, enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)
