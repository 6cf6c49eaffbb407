"""A model's pipeline built from its configs alone, every weight a fake tensor (`utils.memory.fake`).

`model_index.json` names each component's library and class; each is built from its `config.json` as
`from_pretrained` would build it, without the weights: diffusers models with `from_config`, transformers models
with `_from_config`, schedulers for real (they are numbers). Tokenizers, whose files may be absent, are stood in
for by a generated CLIP tokenizer of the same context length: a memory estimate needs the token count, not the
tokens. Components a trainer drops (safety checker, feature extractor, image encoder) are left out. The family
(`utils.families`) is then made from the pipeline exactly as it is made from a loaded one.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from utils.errors import UserError
from utils.families import ModelFamily, read_model_index
from utils.families.model_files import read_component_config

# The stand-in tokenizer's prompt: as long as a CLIP text encoder reads (75 words + start and end tokens), so
# a pipeline that pads to the longest prompt sees a long one.
ESTIMATE_PROMPT = " ".join(["cat"] * 75)
# The context of a text encoder whose config states none (T5's relative positions): the pipelines pass their own
# max_length for such encoders.
DEFAULT_CONTEXT = 512
DROPPED = ("safety_checker", "feature_extractor", "image_encoder")


def _stand_in_tokenizer(encoder_config: dict | None):
    from utils.toys.tiny_models import build_clip_tokenizer

    context = (encoder_config or {}).get("max_position_embeddings") or DEFAULT_CONTEXT
    tokenizer = build_clip_tokenizer(model_max_length=min(int(context), DEFAULT_CONTEXT))
    # Chat-template text encoders (Qwen, Gemma): the template's words are a small part of a long prompt.
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


def _build_model(library: str, class_name: str, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    # Built in `dtype` from the start (the default dtype): casting fake parameters afterwards would swap them.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if library == "diffusers":
            import diffusers

            model = getattr(diffusers, class_name).from_config(config)
        else:
            import transformers

            cls = getattr(transformers, class_name)
            model = cls._from_config(cls.config_class.from_dict(config), dtype=dtype)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


def build_family(family: type[ModelFamily], name_or_path: str, *, revision: str | None, dtype: torch.dtype,
                 vae_dtype: torch.dtype, family_options: dict[str, Any]) -> ModelFamily:
    """The family of `name_or_path` around a pipeline built from its configs (call under `WeightlessMode`: the
    weights are then fake). The text encoders and the denoiser are in `dtype`, the VAE in `vae_dtype`."""
    index = read_model_index(name_or_path, revision) or {}
    specs = {name: spec for name, spec in index.items() if isinstance(spec, list) and len(spec) == 2}
    configs = {name: read_component_config(name_or_path, name, revision)
               for name, (library, _) in specs.items() if library and name not in DROPPED
               and "tokenizer" not in name}
    missing = sorted(name for name, config in configs.items() if config is None)
    if missing:
        raise UserError(f"the memory estimate needs the config of every component of {name_or_path!r}; "
                        f"missing: {', '.join(missing)}")
    components: dict[str, Any] = {}
    for name, (library, class_name) in specs.items():
        if library is None or name in DROPPED:
            components[name] = None
        elif "tokenizer" in name:
            components[name] = _stand_in_tokenizer(configs.get(name.replace("tokenizer", "text_encoder")))
        elif "scheduler" in name:
            import diffusers

            components[name] = getattr(diffusers, class_name).from_config(configs[name])
        else:
            components[name] = _build_model(library, class_name, configs[name],
                                             vae_dtype if name == "vae" else dtype)
    pipeline_class = family.pipeline_class()
    accepted = inspect.signature(pipeline_class.__init__).parameters
    kwargs = {k: v for k, v in {**components, **family.load_kwargs}.items() if k in accepted}
    pipe = pipeline_class(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return family(pipe, **family_options)
