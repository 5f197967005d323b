"""FID (Heusel et al., 2017) and KID (Bińkowski et al., 2018) through torchmetrics.

torchmetrics implements both exactly (streaming mean/covariance for FID, the unbiased
polynomial-kernel MMD over random subsets for KID) and accepts any feature network, so it
runs without torch-fidelity or torchvision. We supply the network: pytorch-fid's Inception
(``InceptionV3(variant="fid")``) behind pytorch-fid's preprocessing — bilinear resize to
299 x 299 (``align_corners=False``), inputs in ``[-1, 1]`` — so the numbers match
pytorch-fid's ``pt_inception-2015-12-05`` features. Install with
``pip install "ipl-diffusion[metrics]"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ipl_diffusion.errors import UserError
from .inception import InceptionV3


def _torchmetrics_image():
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as err:  # an optional extra
        raise ImportError(
            "FID and KID use torchmetrics, which is not installed: pip install \"ipl-diffusion[metrics]\""
        ) from err
    return FrechetInceptionDistance, KernelInceptionDistance


class PoolFeatures(nn.Module):
    """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, 2048)`` pool features at 299 px (pytorch-fid's path).

    Any other ``nn.Module`` mapping images to ``(B, D)`` can stand in for it (``num_features``
    attribute optional), e.g. a tiny random network in tests.
    """

    num_features = 2048

    def __init__(self, inception: InceptionV3, size: int = 299):
        super().__init__()
        self.inception, self.size = inception, size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.inception.pool_features(x)


def _feed(metric, images, real, batch_size, device):
    for start in range(0, images.shape[0], batch_size):
        metric.update(images[start:start + batch_size].to(device), real=real)


def _device(network):
    param = next(network.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def fid(real_images: torch.Tensor, fake_images: torch.Tensor, features: nn.Module, batch_size: int = 50) -> float:
    """FID between two image sets ``(N, 3, H, W)`` in ``[-1, 1]`` (lower is better).

    ``features``: e.g. ``PoolFeatures(InceptionV3.from_pretrained(path, variant="fid"))``.

    Raises:
        ValueError: fewer than 2 images in either set.
    """
    if real_images.shape[0] < 2 or fake_images.shape[0] < 2:
        raise UserError(
            f"FID needs at least 2 images per set, got {real_images.shape[0]} real and {fake_images.shape[0]} generated"
        )
    FrechetInceptionDistance, _ = _torchmetrics_image()
    device = _device(features)
    metric = FrechetInceptionDistance(feature=features, normalize=False).to(device)  # states beside the features
    _feed(metric, real_images, True, batch_size, device)
    _feed(metric, fake_images, False, batch_size, device)
    return float(metric.compute())


@torch.no_grad()
def kid(real_images: torch.Tensor, fake_images: torch.Tensor, features: nn.Module, subsets: int = 100,
        subset_size: int = 1000, batch_size: int = 50, seed: int | None = 0) -> tuple[float, float]:
    """KID ``(mean, std)`` over ``subsets`` random subsets of ``subset_size`` (lower is better).

    ``subset_size`` is capped to the smaller set (torchmetrics would refuse); ``seed`` fixes the
    subset draws (torch's global generator is restored afterwards).

    Raises:
        ValueError: fewer than 2 images in either set.
    """
    n = min(real_images.shape[0], fake_images.shape[0])
    if n < 2:
        raise UserError(f"KID needs at least 2 images per set, got {real_images.shape[0]} and {fake_images.shape[0]}")
    _, KernelInceptionDistance = _torchmetrics_image()
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=features, subsets=subsets, subset_size=min(subset_size, n))
    device = _device(features)
    metric = metric.to(device)
    _feed(metric, real_images, True, batch_size, device)
    _feed(metric, fake_images, False, batch_size, device)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
