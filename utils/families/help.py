"""What `--help` says of the registered families: their names, and what each LoRA preset adapts in each."""

from __future__ import annotations

import textwrap

from utils.families.base import FAMILIES, ModelFamily


def describe_preset(family: type[ModelFamily], preset: str) -> str:
    """What `--lora_target_modules PRESET` adapts in `family`, as the help says it: the module names (PEFT
    matches a name or its last dotted parts) and the family's note on them."""
    note = family.preset_notes.get(preset)
    return " ".join(family.target_presets[preset]) + (f" ({note})" if note else "")


def family_list(option: str | None = None) -> str:
    """The registered families (those taking trainer option `option`), as `--help` names them."""
    return ", ".join(f.display_name for f in FAMILIES if option is None or option in f.options)


def target_presets_help(wrap: int | None = None) -> str:
    """`--lora_target_modules` help on the presets: what each adapts in each registered family (lines wrapped
    at `wrap` characters)."""
    lines = []
    for preset in dict.fromkeys(p for family in FAMILIES for p in family.target_presets):
        by_text: dict[str, list[str]] = {}
        for family in (f for f in FAMILIES if preset in f.target_presets):
            by_text.setdefault(describe_preset(family, preset), []).append(family.name)
        for text, names in by_text.items():
            line = f"'{preset}' on {'/'.join(names)}: {text}"
            lines += textwrap.wrap(line, wrap, subsequent_indent="    ") if wrap else [line]
    return "\n".join(lines)
