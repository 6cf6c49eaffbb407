"""Reward specs -> Reward modules.

Spec grammar (the trainer's `--reward`):

    spec   := item ("," item)*
    item   := target ["=" weight]          weight: a float, default 1.0
    target := NAME                          a registered reward (see `list_rewards()`)
            | path/to/file.py:ATTR          a Reward subclass or a function (images, prompts) -> Tensor[B]
            | package.module:ATTR           the same, imported from an installed/importable module

Options (`build_reward(spec, **options)`): `key=value` goes to the single reward, or to every part
of a weighted sum that accepts `key`; `"part.key"=value` goes only to that part (`part` is the
registered name, or ATTR for a custom reward). `validate_reward_spec` checks all of this without
loading any model weights, so the trainer can fail fast before it spends minutes loading SD.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .base import Reward, check_inputs, check_scores


class RewardSpecError(ValueError):
    """A reward spec or option that cannot work; the message is one line meant for the user."""


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward: where its class lives (imported lazily) and how to describe it."""

    name: str
    factory: str  # "module:attr", imported only when the reward is built or its options checked
    description: str
    defaults: str = ""  # shown by list_rewards(): default weights / model ids
    fixed: dict[str, Any] = field(default_factory=dict)  # kwargs an alias binds (redness: target=red)


_PICKSCORE_DEFAULTS = "model=yuvalkirstain/PickScore_v1 processor=laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

REGISTRY: dict[str, RewardEntry] = {
    e.name: e
    for e in (
        RewardEntry(
            "pickscore",
            "rewards.pickscore:PickScoreReward",
            "PickScore_v1 (CLIP-H/14 fine-tuned on Pick-a-Pic): logit_scale.exp() * cos(img, txt), ~20-23",
            _PICKSCORE_DEFAULTS,
        ),
        RewardEntry(
            "hpsv2",
            "rewards.hpsv2:HPSv2Reward",
            "HPSv2.1 (open_clip ViT-H-14 + HPS checkpoint): cos(img, txt), ~0.25-0.35 [extra: open_clip_torch]",
            "model=xswu/HPSv2:HPS_v2.1_compressed.pt",
        ),
        RewardEntry(
            "aesthetic",
            "rewards.aesthetic:AestheticReward",
            "LAION aesthetic predictor v2: MLP on normalised CLIP ViT-L/14 image embedding, ~1-10 (prompt-free)",
            "model=openai/clip-vit-large-patch14 head=trl-lib/ddpo-aesthetic-predictor:aesthetic-model.pth (= sac+logos+ava1-l14-linearMSE.pth); weight ~0.05 in sums",
        ),
        RewardEntry(
            "clip",
            "rewards.clip_score:ClipScoreReward",
            "CLIP score: 100 * cos(img, txt) with OpenAI CLIP ViT-L/14, ~15-35",
            "model=openai/clip-vit-large-patch14",
        ),
        RewardEntry(
            "imagereward",
            "rewards.imagereward:ImageRewardReward",
            "ImageReward v1.0 (BLIP + MLP), normalised score; not supported with transformers 5 (see README)",
            "model=THUDM/ImageReward:ImageReward.pt",
        ),
        RewardEntry(
            "brightness",
            "rewards.simple:BrightnessReward",
            "mean Rec.709 luma 0.2126R+0.7152G+0.0722B, in [0, 1] (model-free)",
        ),
        RewardEntry(
            "saturation",
            "rewards.simple:SaturationReward",
            "mean HSV saturation (max-min)/(max+eps), in [0, 1] (model-free)",
        ),
        RewardEntry(
            "colorfulness",
            "rewards.simple:ColorfulnessReward",
            "Hasler-Suesstrunk colourfulness sqrt(sd_rg^2+sd_yb^2)+0.3*sqrt(mu_rg^2+mu_yb^2), ~0-0.6 (model-free)",
        ),
        RewardEntry(
            "compressibility",
            "rewards.simple:CompressibilityReward",
            "-(mean|dI/dx|+mean|dI/dy|): negative total variation, a differentiable JPEG-size proxy, in [-2, 0]",
        ),
        RewardEntry(
            "color",
            "rewards.simple:ColorReward",
            "mean <pixel, c>/|c|^2, c = chroma of target colour: 1 at the target, 0 on greys (model-free)",
            "target=red (name, #rrggbb or r;g;b)",
        ),
        RewardEntry(
            "redness",
            "rewards.simple:ColorReward",
            "mean(R - (G+B)/2), in [-1, 1]: `color` with target=red, the toy demo's colour reward",
            fixed={"target": "red"},
        ),
    )
}

# Alternative spellings users type; they resolve to a registered name.
ALIASES: dict[str, str] = {
    "hps": "hpsv2",
    "hpsv2.1": "hpsv2",
    "image_reward": "imagereward",
    "clipscore": "clip",
    "clip_score": "clip",
    "laion_aesthetic": "aesthetic",
    "colourfulness": "colorfulness",
    "colour": "color",
}

# Options that any reward may be handed by the trainer; parts that do not take them ignore them
# (a model-free reward has nothing to checkpoint). Every other unknown option is an error.
GENERIC_OPTIONS = frozenset({"gradient_checkpointing", "cache_size"})


# --------------------------------------------------------------------------------------------
# Parsing


@dataclass
class SpecItem:
    """One `target[=weight]` item of a spec."""

    label: str  # registered name, or ATTR of a custom reward: what "label.key" options refer to
    weight: float
    entry: RewardEntry | None  # None for custom rewards
    target: str  # the text before "=weight"


def _available() -> str:
    return ", ".join(sorted(REGISTRY))


def _lookup(name: str) -> RewardEntry:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(key, list(REGISTRY) + list(ALIASES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise RewardSpecError(
        f"unknown reward {name!r}{hint}; available: {_available()}; "
        "or a custom reward path/to/file.py:name or package.module:name"
    )


def _is_custom(target: str) -> bool:
    return ":" in target


def parse_reward_spec(spec: str) -> list[SpecItem]:
    """Split a spec into items (names resolved, weights parsed); raises RewardSpecError."""
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"empty reward spec {spec!r}; available: {_available()}")
    items: list[SpecItem] = []
    for raw in spec.split(","):
        raw = raw.strip()
        if not raw:
            raise RewardSpecError(f"empty item in reward spec {spec!r} (stray comma?)")
        target, weight = raw, 1.0
        head, sep, tail = raw.rpartition("=")
        if sep:
            try:
                weight = float(tail)
            except ValueError:
                raise RewardSpecError(
                    f"bad weight {tail.strip()!r} in reward spec item {raw!r}: expected name=float"
                ) from None
            if not math.isfinite(weight):
                raise RewardSpecError(f"weight in reward spec item {raw!r} must be finite")
            target = head.strip()
        if not target:
            raise RewardSpecError(f"missing reward name in spec item {raw!r}")
        if _is_custom(target):
            path, _, attr = target.rpartition(":")
            if not path or not attr:
                raise RewardSpecError(
                    f"bad custom reward {target!r}: expected path/to/file.py:name or package.module:name"
                )
            items.append(SpecItem(label=attr, weight=weight, entry=None, target=target))
        else:
            entry = _lookup(target)
            items.append(SpecItem(label=entry.name, weight=weight, entry=entry, target=target))
    labels = [it.label.lower() for it in items]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise RewardSpecError(
            f"reward {dupes[0]!r} appears twice in spec {spec!r}; give it one weight (weights add up anyway)"
        )
    return items


# --------------------------------------------------------------------------------------------
# Custom rewards


def _load_module_from_file(path: Path) -> Any:
    # One module object per file (keyed by its resolved path) so validating and then building a
    # spec executes the user's file once and both see the same classes.
    resolved = path.resolve()
    mod_name = "_draftplus_reward_" + hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise RewardSpecError(f"custom reward file {str(path)!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise RewardSpecError(
            f"custom reward file {str(path)!r} failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def resolve_custom(target: str) -> Any:
    """Import `path/to/file.py:attr` or `package.module:attr` and return the attribute."""
    where, _, attr = target.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise RewardSpecError(f"custom reward file not found: {str(path)!r} (from {target!r})")
        module = _load_module_from_file(path)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise RewardSpecError(
                f"custom reward module {where!r} is not importable: {type(exc).__name__}: {exc}"
            ) from exc
    if not hasattr(module, attr):
        public = sorted(
            n
            for n, v in vars(module).items()
            if not n.startswith("_") and callable(v) and not inspect.ismodule(v)
        )
        raise RewardSpecError(
            f"custom reward {target!r}: {where!r} has no attribute {attr!r}"
            + (f" (it defines: {', '.join(public)})" if public else "")
        )
    obj = getattr(module, attr)
    if inspect.isclass(obj) and not issubclass(obj, Reward):
        # Calling a class would construct it, not score images: only Reward subclasses are built.
        raise RewardSpecError(
            f"custom reward {target!r} is a class but not a rewards.Reward subclass; subclass Reward "
            "or point at a function (images, prompts) -> Tensor[B]"
        )
    if not (isinstance(obj, Reward) or callable(obj)):
        raise RewardSpecError(
            f"custom reward {target!r} is a {type(obj).__name__}, expected a Reward subclass or a "
            "function (images, prompts) -> Tensor[B]"
        )
    return obj


class FunctionReward(Reward):
    """Wraps a plain function `(images, prompts) -> Tensor[B]` (or a non-Reward module) as a Reward."""

    def __init__(self, fn: Callable[[Tensor, Sequence[str]], Tensor], name: str = "custom") -> None:
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(images, prompts)
        return check_scores(self.fn(images, list(prompts)), images.shape[0], f"custom reward {self.name!r}")


# --------------------------------------------------------------------------------------------
# Options


def _factory_of(item: SpecItem) -> Any:
    if item.entry is None:
        return resolve_custom(item.target)
    factory = _registered_factory(item.entry)
    problem = _unavailable(factory)
    if problem:
        raise RewardSpecError(problem)
    return factory


def _registered_factory(entry: RewardEntry) -> Any:
    # Our reward modules import only torch at module level, so this stays cheap.
    module_name, _, attr = entry.factory.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _unavailable(factory: Any) -> str | None:
    """A reward class may say (cheaply, without importing its model library) why it cannot be built."""
    check = getattr(factory, "availability", None)
    return check() if callable(check) else None


def _accepted(factory: Any, entry: RewardEntry | None) -> tuple[set[str], bool]:
    """(keyword options the factory takes, whether it takes **kwargs)."""
    if isinstance(factory, Reward) or not inspect.isclass(factory):
        return set(), False  # an instance or a plain function takes no options
    params = inspect.signature(factory).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - set(
        entry.fixed if entry else ()
    )
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _assign_options(items: list[SpecItem], factories: list[Any], options: dict[str, Any]) -> list[dict]:
    """Route options to parts; raise RewardSpecError for options no part can take."""
    accepted = [_accepted(f, it.entry) for it, f in zip(items, factories, strict=True)]
    per_part: list[dict[str, Any]] = [{} for _ in items]
    # Unqualified first, so that "part.key" overrides "key" for that part.
    for key, value in sorted(options.items(), key=lambda kv: "." in kv[0]):
        if "." in key:
            prefix, sub = key.rsplit(".", 1)
            prefix_l = ALIASES.get(prefix.lower(), prefix.lower())
            idx = [i for i, it in enumerate(items) if prefix_l in (it.label.lower(), it.target.lower())]
            if not idx:
                raise RewardSpecError(
                    f"option {key!r} names no part of the reward spec (parts: {', '.join(it.label for it in items)})"
                )
            i = idx[0]
            names, var_kw = accepted[i]
            if sub not in names and not var_kw:
                raise RewardSpecError(
                    f"reward {items[i].label!r} takes no option {sub!r}; it takes: {', '.join(sorted(names)) or 'none'}"
                )
            per_part[i][sub] = value
            continue
        takers = [i for i, (names, var_kw) in enumerate(accepted) if key in names or var_kw]
        if not takers:
            if key in GENERIC_OPTIONS:
                continue
            takes = "; ".join(
                f"{it.label}: {', '.join(sorted(a[0])) or 'none'}"
                for it, a in zip(items, accepted, strict=True)
            )
            raise RewardSpecError(f"no reward in the spec takes option {key!r} (options: {takes})")
        for i in takers:
            per_part[i][key] = value
    return per_part


# --------------------------------------------------------------------------------------------
# Public API


class WeightedSumReward(Reward):
    """sum_i w_i * r_i(images, prompts): each part runs once per batch.

    The unweighted per-part scores of the last call are kept (detached) in `last_components`
    so the trainer can log them without scoring twice.
    """

    def __init__(self, parts: Sequence[tuple[str, float, Reward]]) -> None:
        super().__init__()
        if not parts:
            raise ValueError("WeightedSumReward needs at least one part")
        self.labels = [label for label, _, _ in parts]
        self.weights = [float(w) for _, w, _ in parts]
        self.rewards = nn.ModuleList([r for _, _, r in parts])
        self.name = ",".join(f"{label}={w:g}" for label, w in zip(self.labels, self.weights, strict=True))
        self.last_components: dict[str, Tensor] = {}

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        check_inputs(images, prompts)
        total: Tensor | None = None
        components: dict[str, Tensor] = {}
        for label, weight, reward in zip(self.labels, self.weights, self.rewards, strict=True):
            score = check_scores(reward(images, prompts), images.shape[0], f"reward {label!r}")
            components[label] = score.detach()
            total = weight * score if total is None else total + weight * score
        self.last_components = components
        assert total is not None
        return total


def validate_reward_spec(spec: str, **options: Any) -> None:
    """Check a spec (names, weights, custom targets) and option names without loading any weights."""
    items = parse_reward_spec(spec)
    factories = [_factory_of(it) for it in items]
    _assign_options(items, factories, options)


def _build_part(item: SpecItem, factory: Any, opts: dict[str, Any], device: Any, dtype: Any) -> Reward:
    if isinstance(factory, Reward):
        reward = factory
    elif inspect.isclass(factory) and issubclass(factory, Reward):
        names, var_kw = _accepted(factory, item.entry)
        kwargs = dict(item.entry.fixed) if item.entry else {}
        kwargs.update(opts)
        # Model-backed rewards load straight onto the device/dtype if they can; others are moved.
        if dtype is not None and ("dtype" in names or var_kw):
            kwargs.setdefault("dtype", dtype)
        if device is not None and ("device" in names or var_kw):
            kwargs.setdefault("device", device)
        try:
            reward = factory(**kwargs)
        except (ValueError, TypeError) as exc:
            raise RewardSpecError(f"reward {item.label!r}: {exc}") from exc
    elif isinstance(factory, nn.Module) or callable(factory):
        reward = FunctionReward(factory, name=item.label)
    else:  # pragma: no cover - resolve_custom already rejects these
        raise RewardSpecError(f"reward {item.label!r} is not a Reward or a function")
    if device is not None:
        reward = reward.to(device)
    reward.name = item.label
    return reward.freeze()


def build_reward(
    spec: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **options: Any,
) -> Reward:
    """Build the Reward a spec describes (frozen, eval mode); see the module docstring for the grammar.

    `dtype` is the compute dtype of model-backed rewards (fp32 by default); model-free rewards
    always compute in fp32. Scores are float32 `[B]`.
    """
    items = parse_reward_spec(spec)
    factories = [_factory_of(it) for it in items]
    per_part = _assign_options(items, factories, options)
    parts = [
        (it.label, it.weight, _build_part(it, f, o, device, dtype))
        for it, f, o in zip(items, factories, per_part, strict=True)
    ]
    if len(parts) == 1 and parts[0][1] == 1.0:
        reward = parts[0][2]
    else:
        reward = WeightedSumReward(parts).freeze()
    reward.spec = spec  # type: ignore[attr-defined]  # for logs / model cards
    return reward


def list_rewards() -> str:
    """Human-readable list of registered rewards, one line each (what `--reward help` prints)."""
    width = max(len(n) for n in REGISTRY)
    lines = ["Rewards (spec: name | name=w,name=w,... | path/to/file.py:name | package.module:name):"]
    for name, entry in REGISTRY.items():
        defaults = f"  [{entry.defaults}]" if entry.defaults else ""
        if _unavailable(_registered_factory(entry)):
            defaults += "  (unavailable in this environment)"
        lines.append(f"  {name:<{width}}  {entry.description}{defaults}")
    lines.append(
        "Options: key=value for all parts that take it, part.key=value for one part of a sum "
        "(e.g. pickscore.model=/local/dir)."
    )
    return "\n".join(lines)


def parse_reward_options(pairs: Iterable[str]) -> dict[str, Any]:
    """`["pickscore.model=/dir", "gradient_checkpointing=true"]` -> dict with bool/int/float/None coerced."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RewardSpecError(f"bad reward option {pair!r}: expected key=value")
        out[key.strip()] = _coerce(value.strip())
    return out


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
