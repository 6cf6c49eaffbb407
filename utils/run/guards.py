"""Guards of the training loop: non-finite steps, non-finite weights, and LoRA agreement across ranks.

Every decision that changes what a rank does next (skip this update, stop the run) is agreed across
processes first (`any_rank`), so the ranks of a data-parallel run never take different branches
around a collective and hang.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from utils.errors import EXIT_RUN_FAILED, UserError

EXIT_NONFINITE = 3  # the run stopped on non-finite values (nothing non-finite was written)


class NonFiniteError(UserError, RuntimeError):
    """The run cannot go on: too many non-finite steps in a row, or non-finite weights."""

    exit_code = EXIT_NONFINITE


class LoraDesyncError(UserError, RuntimeError):
    """The processes of a data-parallel run ended with different LoRA weights."""

    exit_code = EXIT_RUN_FAILED


def any_rank(accelerator, flag: bool | torch.Tensor) -> bool:
    """True on every process if `flag` is true on any of them (one tiny all-reduce)."""
    value = torch.as_tensor(flag, dtype=torch.float32, device=accelerator.device).reshape(1)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t.detach()).all()) for t in tensors)


@dataclass
class NonFiniteSteps:
    """Counts steps skipped for a non-finite loss or gradient norm; `max_consecutive` in a row stop the run.

    A skipped step gets no optimizer update and no LR-scheduler step (as a mixed-precision loss
    scaler skips an overflowing step). Under fp16 with a gradient scaler, gradient overflow is the
    scaler's to handle (it skips the update and lowers its scale, as in every fp16 recipe), so only
    a non-finite loss counts there; and since the scaler has already unscaled this step's gradients
    (for clipping), a skipped step still closes its step with `scaler.update()`, or the next
    unscale would fail.
    """

    max_consecutive: int
    total: int = 0
    consecutive: int = 0
    skipped_steps: list[int] = field(default_factory=list)

    def check(self, accelerator, loss: torch.Tensor, grad_norm: torch.Tensor | float, step: int) -> bool:
        """Whether this step's update may be applied (the same answer on every process)."""
        bad = not math.isfinite(float(loss))
        if getattr(accelerator, "scaler", None) is None:
            bad = bad or not math.isfinite(float(grad_norm))
        if any_rank(accelerator, bad):
            scaler = getattr(accelerator, "scaler", None)
            if scaler is not None:
                scaler.update()
            self.total += 1
            self.consecutive += 1
            self.skipped_steps.append(step)
            return False
        self.consecutive = 0
        return True

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def stop_message(self, last_checkpoint: str | None) -> str:
        first = self.skipped_steps[-self.consecutive]
        return (f"{self.consecutive} steps in a row (steps {first}-{self.skipped_steps[-1]}) had a non-finite "
                f"loss or gradient and were skipped; stopping (--max_nonfinite_steps {self.max_consecutive}). "
                f"The LoRA was not updated on them; last checkpoint: {last_checkpoint or 'none'}. Lower "
                "--learning_rate, check the reward, or raise --max_nonfinite_steps")


def ensure_finite_weights(accelerator, params: Iterable[torch.Tensor], what: str) -> None:
    """Refuse to write `what` (a checkpoint, the LoRA) when any LoRA weight is NaN/inf on any rank."""
    if any_rank(accelerator, not all_finite(params)):
        raise NonFiniteError(f"the LoRA weights are not finite; {what} was not written (the files already "
                             "there are intact). Lower --learning_rate or check the reward")


def finite_or_none(logs: Mapping[str, object]) -> dict[str, object]:
    """JSON lines hold `null` where a value (or an item of a list value) is NaN/inf: bare NaN is not JSON."""

    def clean(v):
        if isinstance(v, list):
            return [clean(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return {k: clean(v) for k, v in logs.items()}


def lora_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a LoRA state dict's names and fp32 bytes, independent of key order and of the
    denoiser prefix of saved files ("unet.", "transformer."), so an in-memory LoRA and its file give the same
    digest."""
    from utils.families import FAMILIES

    prefixes = tuple(dict.fromkeys(f"{family.denoiser_name}." for family in FAMILIES))

    def module_key(name: str) -> str:
        return next((name.removeprefix(p) for p in prefixes if name.startswith(p)), name)

    h = hashlib.sha256()
    for name in sorted(state_dict, key=module_key):
        h.update(module_key(name).encode())
        h.update(state_dict[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def ensure_same_lora_on_all_ranks(accelerator, state_dict: Mapping[str, torch.Tensor]) -> str:
    """The LoRA's digest, the same on every process; LoraDesyncError (on all of them) when it is not. Data
    parallelism must leave every process with the same LoRA: a silent desync would make the saved weights
    depend on which rank wrote them."""
    digest = lora_digest(state_dict)
    digests = list(gather_object([digest])) if accelerator.num_processes > 1 else [digest]
    if len(set(digests)) > 1:
        raise LoraDesyncError(f"the LoRA weights differ across processes (sha256 {', '.join(d[:12] for d in digests)}), "
                              "a data-parallel desync; the LoRA was not written")
    return digest
