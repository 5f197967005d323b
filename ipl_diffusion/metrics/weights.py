"""Where the metrics' pretrained feature networks come from: a local file or a Hub id, never a URL.

Every metric network (Inception-v3, HED, ArcFace IR-SE50, the LPIPS backbone and its linear
layers) is given explicitly by the user. Nothing is downloaded behind their back: the
reference implementations fetch weights from dead or rate-limited links at construction time
(and an offline machine then waits on the network), which is exactly what this module refuses
to do.

A *weights source* is one of

* a path to a weights file (``.safetensors``, or an upstream ``.pt`` / ``.pth`` / ``.pytorch``
  pickle, read with ``torch.load(..., weights_only=True)``);
* a path to a folder holding the network's default file name;
* a Hub id ``"owner/repo"`` (the network's default file name inside it) or
  ``"owner/repo/path/in/repo.pth"``, fetched with :func:`huggingface_hub.hf_hub_download`.
  With ``HF_HUB_OFFLINE=1`` only the local cache is consulted, so a missing file fails at
  once instead of waiting on a socket.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ipl_diffusion.errors import UserError, UserFileNotFoundError

_TORCH_PICKLE_SUFFIXES = (".pt", ".pth", ".pytorch", ".ckpt", ".bin")
_WEIGHT_SUFFIXES = _TORCH_PICKLE_SUFFIXES + (".safetensors",)


@dataclass(frozen=True)
class NetworkSpec:
    """What a metric network is and how a user supplies it (used in every error message)."""

    name: str  # e.g. "Inception-v3 (torchvision layout)"
    default_filename: str  # the upstream file name, e.g. "inception_v3_google-0cc3c7bd.pth"
    how_to_supply: str  # e.g. "--inception-weights PATH / inception_weights=PATH"

    def missing_message(self, metric: str) -> str:
        return (
            f"{metric} needs the {self.name} weights, and none were given. Download "
            f"'{self.default_filename}' once and pass its local path ({self.how_to_supply}), or a "
            "Hub id 'owner/repo[/file]' that is in your Hugging Face cache. Metric networks are "
            "never downloaded automatically."
        )


def resolve_weights(source: str | os.PathLike | None, spec: NetworkSpec, metric: str) -> Path:
    """Turn a weights source into a local file path.

    Args:
        source: a file, a folder, a Hub id (see the module docstring), or ``None``.
        spec: the network being loaded; its name and ``how_to_supply`` go into every error.
        metric: the metric asking for it (for the error message), e.g. ``"SIFID"``.

    Returns:
        The path of an existing local file.

    Raises:
        ValueError: ``source`` is ``None`` or empty, or names nothing that exists locally and is
            not a Hub id.
        FileNotFoundError: a folder without the default file, or a Hub id whose file is not in
            the local cache while offline / cannot be fetched.
    """
    if source is None or str(source).strip() == "":
        raise UserError(spec.missing_message(metric))
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / spec.default_filename
        if candidate.is_file():
            return candidate
        raise UserFileNotFoundError(
            f"{metric}: the folder {str(path)!r} given for the {spec.name} weights has no "
            f"'{spec.default_filename}'. Pass the weights file itself ({spec.how_to_supply})."
        )
    parts = str(source).strip("/").split("/")
    # "owner/repo" or "owner/repo/file.pth"; "folder/file.pth" is a missing local file, not a repo.
    looks_like_hub_id = (
        not str(source).startswith((".", "/", "~", "\\"))
        and ":" not in parts[0]
        and (len(parts) >= 3 or (len(parts) == 2 and Path(parts[1]).suffix not in _WEIGHT_SUFFIXES))
    )
    if not looks_like_hub_id:
        raise UserFileNotFoundError(
            f"{metric}: the {spec.name} weights file {str(source)!r} does not exist ({spec.how_to_supply})."
        )
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:]) or spec.default_filename
    from huggingface_hub import hf_hub_download

    from ipl_diffusion.clip_loading import hub_offline  # read at call time, not at hub import

    offline = hub_offline()
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
    except Exception as err:  # hub errors have many types; the user needs one clear message
        mode = "offline (HF_HUB_OFFLINE=1), and it is not in the local cache" if offline else str(err)
        raise UserFileNotFoundError(
            f"{metric}: {str(source)!r} is not a local file, and the {spec.name} weights '{filename}' could not "
            f"be taken from the Hub repo {repo_id!r}: {mode}. Pass a local file instead ({spec.how_to_supply})."
        ) from err


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or an upstream torch pickle (``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        kind = "an upstream torch file" if path.suffix in _TORCH_PICKLE_SUFFIXES else "a weights file"
        raise UserError(f"{str(path)!r} could not be read as {kind} with weights_only=True: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{str(path)!r} does not hold a plain state dict of tensors.")
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], spec: NetworkSpec, source: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that names the expected layout."""
    expected, given = set(module.state_dict()), set(state)
    # Files saved before PyTorch 0.4.1 (torchvision's Inception, LPIPS' AlexNet) have no BatchNorm
    # ``num_batches_tracked``; ``load_state_dict`` fills it in itself, so it is not a layout error.
    missing = sorted(k for k in expected - given if not k.endswith("num_batches_tracked"))
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise UserError(
            f"{source!r} is not in the {spec.name} layout ('{spec.default_filename}'): "
            f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}."
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise UserError(f"{source!r} does not match the {spec.name} architecture: {err}") from err
