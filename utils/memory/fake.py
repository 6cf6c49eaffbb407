"""Weightless tensors for a memory trace: `WeightlessMode`, a fake-tensor mode that keeps the small numbers real.

Under `torch._subclasses.fake_tensor.FakeTensorMode` a tensor has a shape, a dtype and a device but no data:
building a 12-billion-parameter transformer allocates nothing and its forward computes nothing, yet every op
returns an output of the size the real op would. The rollout's glue code, though, reads numbers: a scheduler
compares a timestep with zero, finds its step index with `nonzero`, a tokenizer's ids are compared with
`torch.equal`. Those tensors are tiny (timesteps, sigmas, token ids), so this mode computes them for real: an op
none of whose inputs is fake runs on real tensors, and so does a factory (zeros, arange, ...) whose output is
small. Everything that holds weights or activations is fake, and its size is what a memory tracker counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_flatten

# A factory op's output of at most this many elements is made real: timesteps, sigmas, alphas (1000), scalars.
# Weights and activations are far larger; the few small real ones (a norm's bias) are counted all the same.
SMALL_NUMEL = 4096


def _numel(out) -> int:
    return sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


_SWAP_TENSORS = torch.utils.swap_tensors


def _swap_or_set_data(t1: torch.Tensor, t2: torch.Tensor) -> None:
    try:
        _SWAP_TENSORS(t1, t2)
    except RuntimeError:
        with torch.no_grad():
            t1.data = t2.data if isinstance(t2, torch.nn.Parameter) else t2


class WeightlessMode(FakeTensorMode):
    """FakeTensorMode for large tensors, real computation for small ones (see the module's doc).

    While models are built (`real_small_numbers` off, the default) every new tensor a factory makes is fake, a
    norm's bias as much as a weight matrix: an op mixing real and fake inputs misses the fake-tensor cache, and a
    model's every op would. Turn it on for the step the trace runs."""

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.real_small_numbers = False

    def __enter__(self):
        # `Module.to` swaps a fake parameter with its converted copy (torch.utils.swap_tensors), which refuses
        # tensors that the fake mode itself holds weak references to; pointing the parameter at the copy's data
        # is the same for every use here.
        self._swap_tensors = torch.utils.swap_tensors
        torch.utils.swap_tensors = _swap_or_set_data
        return super().__enter__()

    def __exit__(self, *exc):
        torch.utils.swap_tensors = self._swap_tensors
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def with_real_small_numbers(self) -> Iterator[None]:
        self.real_small_numbers = True
        try:
            yield
        finally:
            self.real_small_numbers = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.index.Tensor and _has_real_mask(args[1]):
            # `fake[real_bool_mask]` (e.g. a pipeline dropping padded tokens): the output's size depends on the
            # mask's values, which are real, so index with the mask's real positions instead.
            return self.__torch_dispatch__(func, types, (args[0], _mask_positions(args[1])), kwargs)
        flat = tree_flatten((args, kwargs))[0]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if any(isinstance(t, FakeTensor) for t in tensors):
            return super().__torch_dispatch__(func, types, args, kwargs)
        if tensors:  # real inputs only: a real (small) computation
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        out = super().__torch_dispatch__(func, types, args, kwargs)  # a factory: its size, for free
        if not self.real_small_numbers or _numel(out) > SMALL_NUMEL or torch.Tag.nondeterministic_seeded in func.tags and _numel(out) > 1:
            return out
        with unset_fake_temporarily():
            return func(*args, **kwargs)


def _has_real_mask(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and not isinstance(i, FakeTensor) and i.dtype == torch.bool
               for i in indices)


def _mask_positions(indices) -> list:
    """Advanced indices with every real boolean mask replaced by the positions it selects (as indexing reads it)."""
    out = []
    for index in indices:
        if isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) and index.dtype == torch.bool:
            with unset_fake_temporarily():
                out += list(index.nonzero(as_tuple=True))
        else:
            out.append(index)
    return out

