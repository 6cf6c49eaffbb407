"""The errors the rewards package raises for bad input; each carries one line meant for the user.

`RewardError` is their base, so callers catch one type (utils.errors lists it beside its own UserError).
"""

from __future__ import annotations


class RewardError(Exception):
    """A reward problem the user can fix; `str(error)` is one line, `exit_code` what the process exits with."""

    exit_code: int = 2


class RewardSpecError(RewardError, ValueError):
    """A reward spec, option or custom reward that cannot work: raised at validation, before any model
    loads, wherever the spec alone decides it (a custom reward's output can only be judged when it runs)."""


class RewardLoadError(RewardError, RuntimeError):
    """A reward model, processor or head could not be loaded; the message says what to pass instead."""
