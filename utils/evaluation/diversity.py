"""Diversity of a prompt's images: the mean pairwise distance between them, under a named metric.

Used by the evaluator (`python -m utils.evaluation --diversity_metric ...`) and by the trainer's validation
(`--validation_diversity`):

    lpips                   LPIPS with the ImageNet AlexNet trunk (the DRaFT+ paper's diversity measure)
    lpips_random_backbone   the same LPIPS heads on a fixed-seed random AlexNet: a deterministic, offline
                            stand-in whose values are not comparable to real LPIPS
    pixel_l2                root-mean-square pixel difference in [0, 1]
    dino                    1 - cosine similarity of DINOv2 [CLS] embeddings (as ImageReFL)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from utils.errors import UserError
from utils.hub import hub_offline

DIVERSITY_METRICS = ("lpips", "lpips_random_backbone", "pixel_l2", "dino")
DEFAULT_DINO_MODEL = "facebook/dinov2-base"


class DiversityError(UserError):
    """A diversity metric that cannot be built (missing or broken weights, unknown name)."""


def alexnet_weights_path() -> Path:
    """Where torchvision keeps its ImageNet AlexNet weights (under TORCH_HOME), the file LPIPS needs."""
    from torchvision.models import AlexNet_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)


def _alexnet_state_dict(missing: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet AlexNet weights, downloaded (hash-checked) if absent, loaded without unpickling
    code (`weights_only=True`: torchvision's own loader would unpickle the file in full)."""
    from torchvision.models import AlexNet_Weights

    path = alexnet_weights_path()
    if not path.is_file():
        if hub_offline():
            raise DiversityError(missing.format(why="they are not there and HF_HUB_OFFLINE=1 forbids downloads"))
        url = AlexNet_Weights.IMAGENET1K_V1.url
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=path.stem.rsplit("-", 1)[-1], progress=False)
        except (OSError, RuntimeError) as e:  # URLError is an OSError; a hash mismatch a RuntimeError
            raise DiversityError(missing.format(why=f"they could not be obtained ({type(e).__name__}: {e})")) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:  # truncated or not a state dict
        raise DiversityError(missing.format(why=f"{path} does not load ({type(e).__name__}: {e})")) from e


def _build_lpips(random_backbone: bool) -> torch.nn.Module:
    """LPIPS (AlexNet) with lpips' own linear heads. The trunk is torchvision's ImageNet AlexNet, loaded by
    `_alexnet_state_dict`, or for the stand-in a fixed-seed random one."""
    import lpips

    missing = (f"LPIPS needs torchvision's ImageNet AlexNet weights at {alexnet_weights_path()}, but {{why}}. "
               "Copy alexnet-owt-7be5be79.pth there (or set TORCH_HOME), or choose the stand-in metric "
               "lpips_random_backbone or pixel_l2.")
    trunk = None if random_backbone else _alexnet_state_dict(missing)  # fails before anything is built
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation, said by lpips
        # A random trunk must be the same random trunk every run, or distances are not comparable.
        torch.manual_seed(0)
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if trunk is not None:
        # lpips splits torchvision's `features` into slices, keeping each layer's index as its name.
        slices = {name.split(".", 1)[1]: name for name, _ in model.net.named_modules() if name.count(".") == 1}
        mapped = {f"{slices[k.split('.')[1]]}.{k.rsplit('.', 1)[1]}": v for k, v in trunk.items()
                  if k.startswith("features.") and k.split(".")[1] in slices}
        expected = set(model.net.state_dict())
        if set(mapped) != expected:
            raise DiversityError(missing.format(why=f"the file does not hold AlexNet's feature layers "
                                                    f"(missing {sorted(expected - set(mapped))[:3]})"))
        model.net.load_state_dict(mapped)
    return model.eval().requires_grad_(False)


def _build_dino(name_or_path: str, device: torch.device):
    from transformers import AutoImageProcessor, Dinov2Model

    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
        model = Dinov2Model.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise DiversityError(f"cannot load the DINOv2 model {name_or_path!r} for the dino diversity metric: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return processor, model.to(device).eval().requires_grad_(False)


class Diversity:
    """Mean pairwise distance between the images of one prompt, under `metric` (see the module doc).

    `model`: for `dino`, the DINOv2 model (a local directory or hub id; default facebook/dinov2-base).
    """

    def __init__(self, metric: str = "lpips", device: torch.device | str = "cpu", model: str | None = None) -> None:
        if metric not in DIVERSITY_METRICS:
            raise DiversityError(f"unknown diversity metric {metric!r}; choose one of {', '.join(DIVERSITY_METRICS)}")
        self.metric = metric
        self.device = torch.device(device)
        self.model_name = (model or DEFAULT_DINO_MODEL) if metric == "dino" else None
        self.model = self.processor = None
        if metric == "dino":
            self.processor, self.model = _build_dino(self.model_name, self.device)
        elif metric != "pixel_l2":
            self.model = _build_lpips(metric == "lpips_random_backbone").to(self.device)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`dino`: unit-norm DINOv2 [CLS] embeddings `[N, D]` of images `[N, 3, H, W]` in [0, 1]."""
        inputs = self.processor(images=list(images.float().cpu()), return_tensors="pt", do_rescale=False)
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        return torch.nn.functional.normalize(self.model(pixel_values=pixels).pooler_output.float(), dim=-1)

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distances `[N]` between image batches `[N, 3, H, W]` in [0, 1]."""
        if self.metric == "dino":
            return 1 - (self.embed(a) * self.embed(b)).sum(-1)
        a, b = a.to(self.device, torch.float32), b.to(self.device, torch.float32)
        if self.model is None:
            return (a - b).pow(2).flatten(1).mean(1).sqrt()
        return self.model(a, b, normalize=True).flatten()  # normalize: [0, 1] -> LPIPS's [-1, 1]

    def __call__(self, images: torch.Tensor) -> float:
        """Mean pairwise distance among images `[S, 3, H, W]` (S >= 2) of one prompt."""
        if images.shape[0] < 2:
            raise DiversityError("diversity needs at least 2 images per prompt")
        i, j = torch.triu_indices(images.shape[0], images.shape[0], offset=1)
        if self.metric == "dino":  # embed each image once, not once per pair
            embeddings = self.embed(images)
            return float(1 - (embeddings[i] * embeddings[j]).sum(-1).mean())
        return float(self.distance(images[i], images[j]).mean())


def lpips_or_stand_in(device: torch.device | str = "cpu", log: Callable[[str], None] = print) -> Diversity:
    """LPIPS where torchvision's AlexNet weights are available (on disk, or downloadable), else the
    `lpips_random_backbone` stand-in, said once through `log`: for logging that must never stop a run."""
    try:
        return Diversity("lpips", device)
    except DiversityError:
        log(f"LPIPS is unavailable (torchvision's AlexNet weights are not at {alexnet_weights_path()} and cannot "
            "be downloaded): using the lpips_random_backbone stand-in, whose values are not comparable to LPIPS")
        return Diversity("lpips_random_backbone", device)


def lpips_unreachable() -> bool:
    """LPIPS cannot be built without a download that offline mode forbids: a check that needs no model."""
    return not alexnet_weights_path().is_file() and hub_offline()
