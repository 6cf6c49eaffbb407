"""The estimate as printed by `train_draftplus.py --estimate_memory`: the peak, what it holds by part, the peak of
each phase of the step, and the cards it fits, against the 24, 48 and 80 GB ceilings."""

from __future__ import annotations

from utils.memory.estimate import MemoryEstimate
from utils.memory.step import GRADIENTS, LORA, OPTIMISER, PHASES, PROMPTS

CEILINGS_GB = (24, 48, 80)
GIB = 2**30


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def part_rows(estimate: MemoryEstimate) -> list[tuple[str, int]]:
    """What the peak holds: weights by component, the LoRA, its gradients and optimiser state, then the phases'
    activations and temporaries still alive, then the computed parts (corrections included)."""
    held = estimate.held()
    weights = sorted((k for k in held if k.startswith("weights: ")), key=lambda k: -held[k])
    training = [k for k in (LORA, GRADIENTS, OPTIMISER) if k in held]
    phases = [k for k in PHASES if k in held]
    rest = [k for k in held if k not in (*weights, *training, *phases)]
    return [(k, held[k]) for k in (*weights, *training, *phases, *rest) if held[k]]


def fits(total: int) -> list[tuple[int, bool]]:
    return [(gb, total <= gb * 1e9) for gb in CEILINGS_GB]


def render(estimate: MemoryEstimate) -> str:
    """The printed report."""
    s = estimate.settings
    lines = [f"Estimated peak GPU memory of one training step, per process: {gib(estimate.total)} GiB "
             f"({estimate.total / 1e9:.2f} GB)",
             f"  {s.get('model')} ({s.get('family')}), {s.get('height')}x{s.get('width')}, batch {s.get('batch')}, "
             f"{s.get('dtype')}, K={s.get('K')}, gradient checkpointing {'on' if s.get('gradient_checkpointing') else 'off'}, "
             f"reward {s.get('reward')} ({s.get('reward_dtype')})",
             f"  The peak comes during: {estimate.peak_phase}", "",
             # With the floor as the peak, the parts are the step's own peak's, which the floor is above.
             f"Held at the {'' if estimate.peak_phase == estimate.peak.phase else estimate.peak.phase + ' '}peak (GiB):"]
    width = max(len(k) for k, _ in part_rows(estimate))
    lines += [f"  {k:<{width}}  {gib(v):>8}" for k, v in part_rows(estimate)]
    lines += ["", "Peak during each phase (GiB):"]
    computed = sum(p.bytes for p in estimate.computed)
    # The prompt encoding's peak with offloaded text encoders is the floor, which holds them; encoded apart
    # (--precompute_prompt_embeddings), the floor is that encoding's peak (0 on the CPU).
    apart = estimate.floor or estimate.encoding_apart
    lines += [f"  {k:<{width}}  {gib(estimate.floor if k == PROMPTS and apart else v + computed):>8}"
              for k, v in estimate.phase_peaks.items() if k in PHASES]
    if estimate.computed:
        lines += ["", "Computed, not traced:"] + [f"  {p.label}: {gib(p.bytes)} GiB ({p.how})" for p in estimate.computed]
    if estimate.notes:
        lines += ["", "Notes:"] + [f"  {note}" for note in estimate.notes]
    lines += ["", "Against the cards (the CUDA context, ~0.5 GB, and allocator fragmentation come on top):"]
    lines += [f"  {gb} GB: {'fits' if ok else 'does not fit'}" for gb, ok in fits(estimate.total)]
    return "\n".join(lines)
