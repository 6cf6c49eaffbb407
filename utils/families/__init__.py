"""Model families, one module each; only this package names diffusers pipeline classes.

`base` holds the interface every family implements and the registry; `model_files` reads a model's configs
(no weights) and picks its family. Importing the package registers every family.
"""

# Each family module registers its families on import; the registry lists them in this order (messages, --help).
# isort: off
from utils.families import stable_diffusion  # noqa: F401
from utils.families import sd3  # noqa: F401
from utils.families import flux  # noqa: F401
from utils.families import qwen_image  # noqa: F401
from utils.families import z_image  # noqa: F401
from utils.families import flux2  # noqa: F401
# isort: on
from utils.families.base import (
    FAMILIES,
    ModelFamily,
    UnsupportedModelError,
    classifier_free_guidance,
    family_for_class_name,
)
from utils.families.flow import FlowTransformerFamily, TransformerPromptEmbeds
from utils.families.flux import Flux
from utils.families.model_files import (
    family_of,
    load_family,
    read_denoiser_config,
    read_model_index,
    read_native_size,
)
from utils.families.sd3 import StableDiffusion3
from utils.families.stable_diffusion import PromptEmbeds, StableDiffusion, StableDiffusionXL, UNetFamily

__all__ = [
    "FAMILIES", "Flux", "FlowTransformerFamily", "ModelFamily", "PromptEmbeds", "StableDiffusion",
    "StableDiffusion3", "StableDiffusionXL", "TransformerPromptEmbeds", "UNetFamily", "UnsupportedModelError",
    "classifier_free_guidance", "family_for_class_name", "family_of", "load_family", "read_denoiser_config",
    "read_model_index", "read_native_size",
]
