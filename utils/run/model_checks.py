"""The argument checks that ask the model, the reward and the hub (part of `utils.run.arg_checks`): the model
exists and is one we train, its denoiser config and native size (no weights), the family's defaults filled
in, the VAE and weight variant, the reward's models, and the hub for `--push_to_hub`."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

from huggingface_hub import get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from utils.errors import ArgumentError, first_line
from utils.families import ModelFamily, family_for_class_name, read_denoiser_config, read_model_index
from utils.hub import hub_cached, hub_offline, looks_like_path
from utils.rollout.schedulers import scheduler_class_name
from utils.toys.toy import TOYS


def check_rollout_length(args: Any) -> None:
    """K <= T, once T is known (the family's default when not given)."""
    if not args.truncation_steps <= args.num_inference_steps:
        raise ArgumentError(f"--truncation_steps must be between 1 and --num_inference_steps "
                            f"({args.num_inference_steps}), got {args.truncation_steps}")


def check_model(name: str, revision: str | None, scheduler: str | None,
                env: Mapping[str, str] = os.environ) -> tuple[type[ModelFamily], str]:
    """The model exists (locally, in the hub cache, or on a reachable hub), its family is one we train, and
    the sampler `--scheduler` names (None: the family's default) can serve the rollout. Returns the family
    and the sampler's class; reads `model_index.json` alone (from the hub if it must), no weights."""
    if name != "toy" and os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model_index.json")):
            raise ArgumentError(f"{name!r} is not a diffusers pipeline directory (no model_index.json)")
    elif name not in TOYS:
        if "/" not in name and (near := difflib.get_close_matches(name, TOYS, n=1)):  # no hub id, a typo
            raise ArgumentError(f"model {name!r} is neither a local directory nor a built-in toy; did you mean "
                                f"{near[0]!r}?")
        if looks_like_path(name):
            raise ArgumentError(f"model path {name!r} does not exist")
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise ArgumentError(f"model {name!r} is neither a local directory nor a valid hub id") from None
    index = read_model_index(name, revision, local_only=True)
    if index is None and hub_offline(env):
        raise ArgumentError(f"model {name!r} is not a local directory nor in the hub cache, and HF_HUB_OFFLINE "
                            "is set; point --pretrained_model_name_or_path at a local copy (a directory saved "
                            "with save_pretrained)")
    if index is None:
        check_on_hub(name, revision)
        try:
            index = read_model_index(name, revision)
        except (OSError, ValueError) as e:  # gated, or the connection failed since
            raise ArgumentError(f"could not read {name!r}'s model_index.json from the hub ({first_line(e)}); "
                                "point --pretrained_model_name_or_path at a local copy") from None
    family = family_for_class_name(index.get("_class_name", "?"))
    model_scheduler = (index.get("scheduler") or [None, None])[1]
    return family, scheduler_class_name(scheduler or family.default_scheduler, model_scheduler,
                                        family.rollout_schedulers)


def check_denoiser_config(name: str, revision: str | None) -> dict | None:
    """The denoiser's config.json (no weights), which the LoRA presets and rollout defaults of some families
    read; None where it cannot be read (the families then use what holds for most of their models)."""
    try:
        return read_denoiser_config(name, revision)
    except (OSError, ValueError) as e:  # not on the hub, no network, gated
        raise ArgumentError(f"could not read the denoiser config of {name!r} ({first_line(e)}); point "
                            "--pretrained_model_name_or_path at a local copy") from None


def apply_family_defaults(args: Any, family: type[ModelFamily], denoiser_config: dict | None,
                          native_size: int | None) -> None:
    """Fill in the options the user left out whose defaults are the family's (the image size: the model's
    `native_size`, as its pipeline defaults it), and refuse the options the family does not take (one line
    each, before any model loads)."""
    if args.resolution is None:
        if native_size is None:
            raise ArgumentError(f"the native image size of {args.pretrained_model_name_or_path!r} cannot be read "
                                "from its configs; give --resolution")
        args.resolution = native_size
    # --height and --width follow --resolution; `native_size` says whether that is the model's own size
    args.height = args.height if args.height is not None else args.resolution
    args.width = args.width if args.width is not None else args.resolution
    if (problem := family.option_problem(args, denoiser_config)) is not None:
        raise ArgumentError(problem)
    if args.scheduler is None:
        args.scheduler = family.default_scheduler
    for name, value in family.rollout_defaults(denoiser_config).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_rollout_length(args)


def check_on_hub(name: str, revision: str | None) -> None:
    """The model is on the hub, asked once (no retries): a mistyped id or revision, or a hub that cannot be
    reached, is told at once instead of after the downloader's retries (about 25 s) and a traceback."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        huggingface_hub.HfApi().model_info(name, revision=revision, timeout=20)
    except GatedRepoError:
        return  # its files need a login; reading model_index.json says so
    except RepositoryNotFoundError:
        raise ArgumentError(f"model {name!r} is not on the hub (no such repository, or a private one this login "
                            "cannot see): check the id, or log in with `hf auth login`") from None
    except RevisionNotFoundError:
        raise ArgumentError(f"model {name!r} has no revision {revision!r} on the hub; check --revision") from None
    except Exception as e:  # the connection (httpx errors are no OSError), a server error
        raise ArgumentError(f"could not reach the hub to look up model {name!r} ({type(e).__name__}: "
                            f"{first_line(e)}); check the connection, or point --pretrained_model_name_or_path "
                            "at a local copy") from None


def check_vae(name: str) -> None:
    if os.path.isdir(name):
        if not any(os.path.isfile(os.path.join(name, sub, "config.json")) for sub in ("", "vae")):
            raise ArgumentError(f"--pretrained_vae_model_name_or_path {name!r} holds no VAE config.json")
    elif name.startswith(("/", ".", "~")):
        raise ArgumentError(f"--pretrained_vae_model_name_or_path {name!r} does not exist")


def check_variant(model: str, variant: str | None, family: type[ModelFamily]) -> None:
    denoiser = os.path.join(model, family.denoiser_name)
    if variant and os.path.isdir(denoiser) and not any(f".{variant}." in name for name in os.listdir(denoiser)):
        raise ArgumentError(f"--variant {variant}: {denoiser} has no {variant} weights (files named *.{variant}.*); "
                            "drop --variant to load the default weights")


def check_reward_reachable(spec: str, options: Mapping[str, Any], env: Mapping[str, str] = os.environ) -> None:
    """The weights of every model-backed part of the reward (its `model=` and `head=`, given or
    default) are local, or on the hub when the hub can be reached. Processors and tokenizers follow
    the model and are checked when the reward loads."""
    from rewards import model_references

    for reference in model_references(spec, options):
        _check_reward_ref(reference.label, reference.key, reference.value, env)


def _check_reward_ref(label: str, key: str, text: str, env: Mapping[str, str]) -> None:
    if os.path.exists(os.path.expanduser(text)):
        return
    repo, sep, _ = text.partition(":")
    if not sep and looks_like_path(text) or sep and looks_like_path(repo):
        raise ArgumentError(f"reward {label!r}: {key}={text!r} does not exist")
    repo = repo if sep else text
    if repo.count("/") == 1 and hub_offline(env) and not hub_cached(repo):
        raise ArgumentError(
            f"reward {label!r} needs {key} {text!r} from the hub, which is not in the local cache, and HF_HUB_OFFLINE "
            f"is set; point at a local copy with --reward_options {label}.{key}=/path/to/local/copy")


def check_hub(args: Any, env: Mapping[str, str] = os.environ) -> None:
    if not args.push_to_hub:
        return
    if hub_offline(env):
        raise ArgumentError("--push_to_hub needs the hub, and HF_HUB_OFFLINE is set")
    if not (args.hub_token or get_token()):
        raise ArgumentError("--push_to_hub needs a hub token: run `hf auth login` (or set HF_TOKEN)")


def token_warning(args: Any) -> str | None:
    if args.hub_token is None:
        return None
    return ("warning: a token given with --hub_token is visible to other users of this machine (process list, "
            "shell history); prefer `hf auth login` or HF_TOKEN. It is never written to logs, trackers, cards "
            "or checkpoints")
