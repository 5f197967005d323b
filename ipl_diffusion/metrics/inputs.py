"""Checks of the image tensors the metrics take: ``(N, 3, H, W)`` float in ``[-1, 1]``."""

from __future__ import annotations

import torch

from ipl_diffusion.errors import UserError


def as_rgb(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """``(N, 3, H, W)`` as is; ``(N, 1, H, W)`` grey images repeated to 3 channels, as loading
    a grey file does (PIL's ``L -> RGB``); a single ``(C, H, W)`` image gets a batch axis.

    Raises:
        UserError: any other shape; the message names ``name`` and the expected shape.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"{name} must be (N, 3, H, W) (or (N, 1, H, W) grey) in [-1, 1]; got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def check_signed_range(metric: str, *tensors: torch.Tensor) -> None:
    """Refuse images that are not in ``[-1, 1]``.

    Values outside ``[-1, 1]`` (1e-3 slack) are refused, e.g. ``[0, 255]`` images; so are inputs
    that all lie in ``[0, 1]`` (no value below 0 in any of ``tensors``), which is what ``[0, 1]``
    images look like -- real ``[-1, 1]`` images almost always have a pixel darker than mid-grey.

    Raises:
        UserError: naming ``metric``, the values found and the mapping to ``[-1, 1]``.
    """
    low = min(t.min().item() for t in tensors)
    high = max(t.max().item() for t in tensors)
    fix = "map [0, 1] images with 2 * x - 1, [0, 255] ones with x / 127.5 - 1"
    if low < -1.001 or high > 1.001:
        raise UserError(f"{metric} expects images in [-1, 1]; got values in [{low:.3g}, {high:.3g}] ({fix})")
    if low >= 0:
        raise UserError(
            f"{metric} expects images in [-1, 1]; got only values in [{low:.3g}, {high:.3g}], as [0, 1] images have "
            f"({fix}; set check_range=False if these really are [-1, 1] images without a dark pixel)"
        )
