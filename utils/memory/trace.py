"""The memory tracker: every tensor storage alive, by part, and the peak of their sum.

`MemoryTrace` is a `TorchDispatchMode` that sees the output of every op. Each new storage is counted from its
creation until it is freed (a weak reference's callback), under the label of the part it belongs to: the weights
of a component (registered before the trace: `register`), or the phase of the step that allocated it (an
activation, a temporary; `phase`). The running total's maximum is the peak, kept with what made it up.

It counts real tensors and fake ones (`utils.memory.fake`) alike, so the estimate of a model built from configs
and a real run of a tiny one are measured by the same code. Sizes are rounded up to the CUDA caching allocator's
512-byte blocks: the trace runs on CPU, the estimate is for a GPU. (torch's own `MemTracker` counts the same way
but by module and forward/backward, not by the rollout's phases, which this report needs.)
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

CUDA_BLOCK = 512  # bytes: the caching allocator's smallest block (torch.cuda's kMinBlockSize)
SETUP = "other tensors alive before the step"  # the label of what the setup allocated and nobody registered


def storage_bytes(storage: torch.UntypedStorage) -> int:
    return math.ceil(storage.nbytes() / CUDA_BLOCK) * CUDA_BLOCK


@dataclass
class Peak:
    """The largest total of live bytes, when it came (`phase`) and what it held, by label."""

    total: int = 0
    phase: str = ""
    held: dict[str, int] = field(default_factory=dict)


class _Record:
    """A counted storage's label and size (mutable: a storage can be relabelled while alive)."""

    __slots__ = ("label", "size")

    def __init__(self, label: str, size: int) -> None:
        self.label, self.size = label, size


class MemoryTrace(TorchDispatchMode):
    """Counts live storages by label; see the module's doc. Use as a context manager around the traced work."""

    def __init__(self) -> None:
        super().__init__()
        self._records: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> _Record
        self._refs: set[weakref.ref] = set()
        self.live: dict[str, int] = defaultdict(int)
        self.current = 0
        self.phase = SETUP
        self.active = False
        self.counting = True
        self.peak = Peak()
        self.phase_peaks: dict[str, int] = {}

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    # ------------------------------------------------------------------ what is counted
    def register(self, tensors: Iterable[torch.Tensor], label: str) -> None:
        """Count these tensors under `label`, e.g. a component's weights: those allocated before the trace began,
        and those it saw allocated during the setup. A storage registered before keeps its first label (so the
        LoRA, registered first, is not counted as the denoiser's)."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                record = self._records.get(storage)
                if record is None:
                    self._track(storage, label)
                elif record.label == SETUP:
                    self._move(record, label)

    def register_module(self, module: torch.nn.Module, label: str) -> None:
        self.register([*module.parameters(), *module.buffers()], label)

    def relabel(self, tensors: Iterable[torch.Tensor], label: str) -> None:
        """Count these tensors' storages under `label` from now on (e.g. gradients, once they are known)."""
        for t in tensors:
            if (record := self._records.get(t.untyped_storage())) is not None:
                self._move(record, label)

    def _track(self, storage: torch.UntypedStorage, label: str) -> None:
        if storage in self._records:
            return
        record = _Record(label, storage_bytes(storage))
        self._records[storage] = record
        ref = weakref.ref(storage, lambda ref, record=record: self._free(ref, record))
        self._refs.add(ref)
        self.live[label] += record.size
        self.current += record.size
        self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), self.current)
        if self.current > self.peak.total:
            self.peak = Peak(self.current, self.phase, {k: v for k, v in self.live.items() if v})

    def _free(self, ref: weakref.ref, record: _Record) -> None:
        self._refs.discard(ref)
        self.live[record.label] -= record.size
        self.current -= record.size

    def _move(self, record: _Record, label: str) -> None:
        self.live[record.label] -= record.size
        self.live[label] += record.size
        record.label = label

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing allocated inside is counted (work that runs apart, e.g. alone on the GPU before the step)."""
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def restart_peak(self) -> None:
        """The peak from now on: what is alive now, the phases' peaks forgotten (what came before was not on the
        GPU together with what follows, e.g. the text encoders released before the run)."""
        self.peak = Peak(self.current, self.phase, {k: v for k, v in self.live.items() if v})
        self.phase_peaks = {}

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        """New storages are labelled `phase` while inside (restoring the previous phase after)."""
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before

    # ------------------------------------------------------------------ the dispatch hook
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.counting:  # paused
            return out
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage(), self.phase)
        return out
