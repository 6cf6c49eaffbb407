"""`--offload_text_encoders`: the text encoders kept in CPU memory but for their forward calls.

They encode the prompts at the start of each step and sit idle through the rest of it, the peak included (T5-XXL
alone is 9.5 GB in bf16). Hooks move an encoder, and its inputs, to the GPU when it is called and back to the CPU
when its forward returns; its outputs stay on the GPU. The family encodes on its `execution_device`. The same
weights run the same ops, so the embeddings, images and gradients are those of a run without the option; each
encoding costs two copies of the encoder's weights over the bus.
"""

from __future__ import annotations

import torch
from accelerate.utils import send_to_device


def offload_between_calls(module: torch.nn.Module, device: torch.device) -> None:
    """Keep `module` on the CPU but during its forward calls, which run on `device`."""

    def before(module, args, kwargs):
        module.to(device)
        return send_to_device(args, device), send_to_device(kwargs, device)

    def after(module, args, kwargs, output) -> None:
        module.to("cpu")

    module.to("cpu")
    module.register_forward_pre_hook(before, with_kwargs=True)
    module.register_forward_hook(after, with_kwargs=True)
