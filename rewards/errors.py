"""The two errors the rewards package raises for bad input; both carry one line meant for the user."""

from __future__ import annotations


class RewardSpecError(ValueError):
    """A reward spec or option that cannot work (raised at validation, before any model is loaded)."""


class RewardLoadError(RuntimeError):
    """A reward model, processor or head could not be loaded; the message says what to pass instead."""
