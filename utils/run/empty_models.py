"""`--shard` without the whole model in every process's host RAM: the processes other than rank 0 build the modules
that will be sharded (the denoiser and the largest text encoder) on the meta device from their configs, without
reading their weights, and hand them to the pipeline's `from_pretrained` in place of the ones it would load; the
VAE, the other text encoders and the tokenizers load as they do anywhere. After `fully_shard`, rank 0 broadcasts
those modules' weights into every process's shards (`sharding.load_from_rank0`), as accelerate's FSDP
`cpu_ram_efficient_loading` does. For FLUX.2-dev that is ~112 GB of host RAM read once per machine instead of once
per process.

accelerate's own switch (`fsdp_cpu_ram_efficient_loading`) is not the one used: through transformers it would build
every text encoder empty on the other processes, the small ones this trainer keeps whole included.
"""

from __future__ import annotations

from typing import Any

import torch

from utils.families import ModelFamily, read_model_index
from utils.families.model_files import read_component_config
from utils.run.sharding import largest

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # the order `ModelFamily.text_encoders` has


def build_empty(library: str, class_name: str, config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers or transformers model built from its config as `from_pretrained` builds it, every parameter and
    buffer on the meta device (no memory, no weights read)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype`: diffusers' `to(dtype)` warns of modules kept in fp32
    try:
        with torch.device("meta"):
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


def empty_sharded_components(family: type[ModelFamily], name_or_path: str, revision: str | None,
                             dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The pipeline components `--shard` shards, built on the meta device (component name -> module): the denoiser
    and, of the text encoders, the one `sharding.modules_to_shard` picks from the loaded ones (the largest; each is
    built empty here to count its weights, which costs nothing)."""
    index = read_model_index(name_or_path, revision) or {}
    built = {}
    for name in (family.denoiser_name, *TEXT_ENCODERS):
        library, class_name = (index.get(name) or [None, None])[:2]
        if library is not None:
            built[name] = build_empty(library, class_name, read_component_config(name_or_path, name, revision), dtype)
    encoder = largest([built[name] for name in TEXT_ENCODERS if name in built])
    return {name: module for name, module in built.items() if module is built[family.denoiser_name]
            or module is encoder}
