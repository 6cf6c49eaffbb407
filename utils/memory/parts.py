"""The parts of a step's memory a fake-tensor trace cannot see, computed from the models' shapes instead.

bitsandbytes' kernels run on CUDA only, so neither the 4-bit NF4 denoiser (`--quantize_base nf4`) nor 8-bit AdamW
(`--use_8bit_adam`) can be traced here. Their storage follows from bitsandbytes' formats:

- NF4 (`bnb.nn.Linear4bit`, as diffusers' quantizer makes it from every `nn.Linear` of the denoiser but its
  `_keep_in_fp32_modules`): 4 bits per weight, plus one fp32 absmax per block of 64 weights (diffusers'
  default `bnb_4bit_use_double_quant=False`). Each matmul dequantizes its weight to the compute dtype for the
  time of the call (forward, and again for the input's gradient): one such weight is alive at a time, the largest
  at worst.
- 8-bit AdamW (`bnb.optim.AdamW8bit`): two uint8 states per parameter plus one fp32 absmax per block of 256
  (blockwise quantization), for tensors of at least 4096 elements (`min_8bit_size`); smaller ones keep two fp32
  states, as torch's AdamW.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NF4_BLOCK = 64
ADAM8_BLOCK = 256
ADAM8_MIN_SIZE = 4096


@dataclass(frozen=True)
class ComputedPart:
    """A correction to the traced bytes (negative: the trace counted more than the GPU holds), and why."""

    label: str
    bytes: int
    how: str


def nf4_linears(denoiser: torch.nn.Module) -> list[torch.nn.Linear]:
    """The denoiser's layers diffusers' bitsandbytes quantizer turns into 4-bit (before any LoRA is added)."""
    keep = tuple(getattr(denoiser, "_keep_in_fp32_modules", None) or ())
    return [m for name, m in denoiser.named_modules()
            if type(m) is torch.nn.Linear and not any(k in name.split(".") for k in keep)]


def nf4_parts(linears: Sequence[torch.nn.Linear]) -> list[ComputedPart]:
    """What 4-bit storage changes: the Linear weights' bytes as traced (in the compute dtype) replaced by their NF4
    bytes, and the largest weight dequantized for the duration of a matmul."""
    traced = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    nf4 = sum(m.weight.numel() // 2 + m.weight.numel() // NF4_BLOCK * 4 for m in linears)
    largest = max((m.weight.numel() * m.weight.element_size() for m in linears), default=0)
    return [ComputedPart("weights: denoiser (NF4)", nf4 - traced,
                         f"{len(linears)} Linear weights at 4 bits + an fp32 absmax per {NF4_BLOCK} (bitsandbytes)"),
            ComputedPart("NF4 dequantized weight", largest,
                         "the largest Linear weight, dequantized to the compute dtype during its matmul")]


def adam8bit_bytes(params: Sequence[torch.Tensor]) -> int:
    """bitsandbytes AdamW8bit's state for these parameters."""
    total = 0
    for p in params:
        n = p.numel()
        total += 2 * n + 2 * 4 * -(-n // ADAM8_BLOCK) if n >= ADAM8_MIN_SIZE else 2 * 4 * n
    return total
