"""`--precompute_prompt_embeddings`: every conditioning the run needs, encoded once before it and cached on disk.

A step holds the text encoders' weights only to encode its prompts; FLUX.2-dev's (Mistral 3, 24B) is 48 GB in bf16.
With the option the main process encodes, before the denoiser, the VAE and the reward come to the GPU:

- each training prompt alone, as the rollout's `family.encode_prompts` would (the run's negative prompt, guidance
  and size); a step joins its batch's prompts with their conditioning's `join` (`PromptEmbeds.join`,
  `TransformerPromptEmbeds.join`, ...). A batch of one is the prompt's own conditioning, bit for bit; a larger batch
  equals the batched encoding to float rounding (the encoders multiply a batch of one instead of B rows);
- the validation prompts' encodings, as the pipeline asks for them: validation's own pipeline call runs up to its
  denoiser (stopped there), each `encode_prompt` call recorded with its arguments; later the pipeline's
  `encode_prompt` answers the same calls from the cache.

`accelerator`: hooks (utils/run/offload.py) bring each encoder to the GPU for its forward call only, nothing else
resident there (but an nf4 denoiser, which bitsandbytes loads onto the GPU); `cpu`: the encoders never leave the
CPU. Then the text encoders are taken out of the pipeline (utils/families/text_encoders.py), freeing their memory;
nothing later runs them (validation replays, `--shard` finds no encoder to shard, the card and exports need none).

The cache, `<output_dir>/prompt_embeddings/`, is an index (`index.safetensors`: a fingerprint of what the
embeddings depend on: model, revision, variant, family options, dtype, where they were encoded, the prompts,
negative prompt, guidance, size, validation settings, the libraries' versions; each prompt's structure and shard;
validation's encodings) written last, and shards of the training prompts' tensors (`SHARD_BYTES` each: what the
main process holds while it writes). A run whose fingerprint matches reads it and loads no text encoder; another is
encoded anew (the log says what changed). The main process writes it; the other processes load no text encoder and
wait for the index. A step reads only its batch's tensors. Its size is the prompts' embeddings (FLUX.2-dev: 15.7 MB
a prompt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from utils.lora.files import save_atomically
from utils.run.offload import offload_between_calls
from utils.run.validation import sample_validation_latents

CACHE_DIR = "prompt_embeddings"  # in --output_dir
INDEX_NAME = "index.safetensors"  # the fingerprint, each prompt's structure and shard, validation's encodings
SHARD_NAME = "embeddings-{:05d}.safetensors"  # the training prompts' tensors, in order
SHARD_BYTES = 2 * 10**9  # a shard's size: what the main process holds in memory at once while it writes
MODES = ("accelerator", "cpu")
FORMAT = 1  # of the file; part of the fingerprint
WAIT_S = 2.0  # how often a process that does not encode looks for the main process's index
logger = logging.getLogger("draftplus.prompt_cache")


# ------------------------------------------------------------------ what the embeddings depend on
def fingerprint(args: Any, checked: Any, weight_dtype: torch.dtype, device: torch.device, guided: bool
                ) -> dict[str, Any]:
    """Everything that determines the cached embeddings, JSON-able (`guided`: the rollout's classifier-free
    guidance, `RolloutConfig.guided`)."""
    import diffusers
    import transformers

    return json.loads(json.dumps({
        "format": FORMAT, "model": args.pretrained_model_name_or_path, "revision": args.revision,
        "variant": args.variant, "family": checked.family.name, "family_options": checked.family_options,
        "dtype": str(weight_dtype),
        "encoded_on": "cpu" if args.precompute_prompt_embeddings == "cpu" else device.type,
        "prompts_sha256": hashlib.sha256(json.dumps(list(checked.prompts)).encode()).hexdigest(),
        "prompt_count": len(checked.prompts), "negative_prompt": args.negative_prompt, "guided": guided,
        "height": args.height, "width": args.width, "validation_prompts": list(args.validation_prompts),
        "num_validation_images": args.num_validation_images, "guidance_scale": args.guidance_scale,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
    }, sort_keys=True, default=str))


# ------------------------------------------------------------------ structures <-> safetensors
def _flatten(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` (tensors in dataclasses, dicts, lists, tuples) as JSON, its tensors into `tensors` under `name...`."""
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().to("cpu").clone().contiguous()  # own storage: safetensors refuses shared ones
        return {"tensor": name}
    if obj is None or isinstance(obj, bool | int | float | str):
        return {"value": obj}
    if isinstance(obj, list | tuple):
        return {type(obj).__name__: [_flatten(x, f"{name}.{i}", tensors) for i, x in enumerate(obj)]}
    if isinstance(obj, dict):
        return {"dict": {k: _flatten(v, f"{name}.{k}", tensors) for k, v in obj.items()}}
    if dataclasses.is_dataclass(obj):
        fields = {f.name: _flatten(getattr(obj, f.name), f"{name}.{f.name}", tensors) for f in dataclasses.fields(obj)}
        return {"dataclass": f"{type(obj).__module__}:{type(obj).__qualname__}", "fields": fields}
    raise TypeError(f"cannot cache a {type(obj).__name__} of the prompt conditioning")


def _unflatten(structure: dict, tensor: Callable[[str], torch.Tensor]) -> Any:
    if "tensor" in structure:
        return tensor(structure["tensor"])
    if "value" in structure:
        return structure["value"]
    if "list" in structure or "tuple" in structure:
        items = [_unflatten(s, tensor) for s in structure.get("list", structure.get("tuple"))]
        return items if "list" in structure else tuple(items)
    if "dict" in structure:
        return {k: _unflatten(s, tensor) for k, s in structure["dict"].items()}
    module, qualname = structure["dataclass"].split(":")
    if not module.startswith("utils.families."):  # only the families' conditioning types are rebuilt
        raise ValueError(f"{CACHE_DIR}: unexpected type {structure['dataclass']}")
    return getattr(importlib.import_module(module), qualname)(
        **{k: _unflatten(s, tensor) for k, s in structure["fields"].items()})


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, list | tuple):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj):
        return type(obj)(**{f.name: _map_tensors(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)})
    return obj


# ------------------------------------------------------------------ the pipeline's encode_prompt calls
def _bound(fn: Callable, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


def _call_key(bound: inspect.BoundArguments) -> str | None:
    """A call's arguments as a key, but its device (recorded on one, replayed on another); None for a call given
    tensors (embeddings the pipeline passes through: no encoder needed, nothing to cache)."""
    arguments = {k: v for k, v in bound.arguments.items() if k != "device"}
    if any(isinstance(x, torch.Tensor) for v in arguments.values() for x in (v if isinstance(v, list) else [v])):
        return None
    return json.dumps(arguments, sort_keys=True, default=repr)


class _Encoded(Exception):
    """Validation's pipeline call reached its denoiser: its prompts are encoded."""


def record_validation_encodings(family: Any, args: Any, device: torch.device) -> dict[str, Any]:
    """The `encode_prompt` calls of validation's pipeline calls (`sample_validation_latents`), run up to the
    denoiser's first call, on `device`: {call key: its output}."""
    records: dict[str, Any] = {}
    real = family.pipe.encode_prompt

    def encode_prompt(*a: Any, **k: Any) -> Any:
        bound = _bound(real, a, k)
        key = _call_key(bound)
        if "device" in bound.arguments:
            bound.arguments["device"] = device
        out = real(*bound.args, **bound.kwargs)
        if key is not None:
            records[key] = out
        return out

    def stop(module: torch.nn.Module, inputs: Any, kwargs: Any) -> None:
        raise _Encoded

    family.pipe.encode_prompt = encode_prompt
    handle = family.denoiser.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for prompt in args.validation_prompts:
            generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_validation_images)]
            with contextlib.suppress(_Encoded):
                sample_validation_latents(family, args, prompt, generators)
    finally:
        handle.remove()
        del family.pipe.encode_prompt  # the class's own again
    return records


def replay_prompt_encodings(pipe: Any, path: Path) -> int:
    """Make `pipe.encode_prompt` answer the calls recorded in the cache at `path` (validation's) from it, on the
    device each call asks; a call given embeddings goes to the pipeline's own (it needs no encoder), any other is an
    error (its encoder is gone). Returns how many calls it answers."""
    with safe_open(str(path), "pt") as f:
        records = {key: _unflatten(s, f.get_tensor) for key, s in json.loads(f.metadata()["records"]).items()}
    real = pipe.encode_prompt

    def encode_prompt(*a: Any, **k: Any) -> Any:
        bound = _bound(real, a, k)
        key = _call_key(bound)
        if key is None:
            return real(*a, **k)
        if key not in records:
            raise RuntimeError(f"encode_prompt({key}) was not encoded ahead and the text encoders are gone "
                               "(--precompute_prompt_embeddings)")
        device = bound.arguments.get("device") or pipe._execution_device
        return _map_tensors(records[key], lambda t: t.to(device, copy=True))

    pipe.encode_prompt = encode_prompt
    return len(records)


# ------------------------------------------------------------------ the cache
class CachedPromptEmbeddings:
    """`family.encode_prompts` for the run's training prompts, read from the cache: each prompt's conditioning
    (only the batch's tensors are read), joined by its type's `join`, on `device`."""

    def __init__(self, directory: Path, prompts: Sequence[str], settings: tuple, device: torch.device) -> None:
        with safe_open(str(directory / INDEX_NAME), "pt") as f:
            self._entries = json.loads(f.metadata()["train"])  # [shard, structure] per distinct prompt
        self._shards = [safe_open(str(directory / SHARD_NAME.format(k)), "pt")
                        for k in range(1 + max((shard for shard, _ in self._entries), default=-1))]
        self._index = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}  # as `write` stores them
        self.settings, self.device = settings, device

    def __call__(self, prompts: Sequence[str], negative_prompt: str = "", guided: bool = True,
                 height: int | None = None, width: int | None = None) -> Any:
        if (negative_prompt, guided, height, width) != self.settings:
            raise ValueError(f"the cached prompt embeddings were encoded for (negative prompt, guided, height, width) "
                             f"= {self.settings}, not {(negative_prompt, guided, height, width)}")
        missing = [p for p in prompts if p not in self._index]
        if missing:
            raise ValueError(f"prompt not in the cached embeddings: {missing[0]!r}")
        parts = [_unflatten(structure, self._shards[shard].get_tensor)
                 for shard, structure in (self._entries[self._index[p]] for p in prompts)]
        return _map_tensors(type(parts[0]).join(parts), lambda t: t.to(self.device))


class PromptEmbeddingCache:
    """The run's cache directory: whether it holds this run's embeddings, writing them, reading them."""

    def __init__(self, output_dir: str, fingerprint: dict[str, Any]) -> None:
        self.dir = Path(output_dir) / CACHE_DIR
        self.path = self.dir / INDEX_NAME  # written last: once it carries this run's fingerprint, all is there
        self.fingerprint = fingerprint

    def stored_fingerprint(self) -> dict | None:
        try:
            with safe_open(str(self.path), "pt") as f:
                return json.loads((f.metadata() or {}).get("fingerprint", "null"))
        except (OSError, ValueError, SafetensorError):  # none yet, or not one of ours: not this run's
            return None

    def ready(self) -> bool:
        return self.stored_fingerprint() == self.fingerprint

    def differences(self) -> list[str]:
        """What the cache on disk was encoded with that this run differs in (empty: no cache)."""
        stored = self.stored_fingerprint()
        if stored is None:
            return []
        return sorted(k for k in {*stored, *self.fingerprint} if stored.get(k) != self.fingerprint.get(k))

    def write(self, family: Any, args: Any, prompts: Sequence[str], guided: bool, device: torch.device,
              autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        """Encode (see the module's doc) on `device` (the accelerator or the CPU) and write the cache: the shards
        as they fill, the index last."""
        if changed := self.differences():
            logger.warning(f"{self.dir} was encoded with other settings ({', '.join(changed)}): encoding anew")
        self.path.unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        for encoder in family.text_encoders:  # on `device` one at a time, for their forward calls only
            offload_between_calls(encoder.requires_grad_(False).eval(), device)
        family.execution_device = device
        start, entries, shard, shards = time.monotonic(), [], {}, 0
        unique = list(dict.fromkeys(prompts))  # each prompt once, in order
        with torch.no_grad(), autocast():
            for i, prompt in enumerate(unique):
                cond = family.encode_prompts([prompt], args.negative_prompt, guided, height=args.height,
                                             width=args.width)
                entries.append([shards, _flatten(cond, f"p{i}", shard)])
                if i == 0:  # what the whole cache will take, known from the first prompt
                    self._say_size(sum(t.nbytes for t in shard.values()) * len(unique), len(unique))
                if sum(t.nbytes for t in shard.values()) >= SHARD_BYTES or i == len(unique) - 1:
                    save_atomically(shard, self.dir / SHARD_NAME.format(shards), {"format": "pt"})
                    shard, shards = {}, shards + 1
            index: dict[str, torch.Tensor] = {}
            records = {key: _flatten(out, f"v{j}", index)
                       for j, (key, out) in enumerate(record_validation_encodings(family, args, device).items())}
        for stale in self.dir.glob(SHARD_NAME.replace("{:05d}", "*")):  # an earlier cache's, past this one's
            if int(stale.stem.rsplit("-", 1)[1]) >= shards:
                stale.unlink()
        save_atomically(index, self.path, {"fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                                           "train": json.dumps(entries), "records": json.dumps(records)})
        logger.info(f"Encoded {len(unique)} training prompts and validation's {len(records)} encode_prompt call(s) in "
                    f"{time.monotonic() - start:.1f} s on {device.type}: {self.dir} ({shards} shard(s), "
                    f"{sum(f.stat().st_size for f in self.dir.iterdir()) / 1e6:.1f} MB)")

    def _say_size(self, total: int, count: int) -> None:
        free = shutil.disk_usage(self.dir).free
        say = logger.warning if total > free else logger.info
        say(f"Encoding {count} prompts ahead: about {total / 1e9:.1f} GB in {self.dir} ({free / 1e9:.1f} GB free)")

    def wait(self) -> None:
        """Until the main process has written this run's cache (a process that does not encode)."""
        while not self.ready():
            time.sleep(WAIT_S)

    def embeddings(self, prompts: Sequence[str], args: Any, guided: bool, device: torch.device
                   ) -> CachedPromptEmbeddings:
        return CachedPromptEmbeddings(self.dir, prompts, (args.negative_prompt, guided, args.height, args.width),
                                      device)
