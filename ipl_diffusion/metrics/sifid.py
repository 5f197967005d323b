"""Single-Image FID (SinGAN, Rott Shaham et al., ICCV 2019), as in ``SinGAN/SIFID/sifid_score.py``.

For one image, the "samples" are the spatial positions of an early Inception feature map:
SinGAN's ``InceptionV3([0])`` (``dims=64``, what ``sifid_score.py`` passes at the commit whose
``SIFID/inception.py`` we follow, and what later re-implementations such as AIR use) returns
the 64-channel output of Conv2d_1a/2a/2b (before the first max pool) of torchvision's
ImageNet Inception-v3, with no resizing (``resize_input=False``) and ``2x - 1`` input scaling
from ``[0, 1]`` — i.e. our ``[-1, 1]`` images unchanged. Another revision of that script passes
``dims=192`` (output block 1, before the second max pool, as the SinGAN paper's text says);
``dims=192`` selects it. Each image gives ``mu`` = mean over positions and ``sigma`` = unbiased
covariance over positions (``np.cov(rowvar=False)``); SIFID is the Fréchet distance between two
images' Gaussians.

IPL's protocol (IPL issue #3): for each reference image R_k of the target domain, the SIFID
between R_k and each generated image, averaged over the generated images (Table 1 columns
R1-R3).
"""

from __future__ import annotations

import torch

from ipl_diffusion.errors import UserError
from .inception import InceptionV3
from .inputs import as_rgb


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """``||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` in float64.

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of
    ``sigma1 @ sigma2`` (real and non-negative up to round-off for covariance matrices), which
    equals scipy's ``sqrtm`` trace used upstream without the complex-part checks.
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    eigenvalues = torch.linalg.eigvals(sigma1 @ sigma2)
    tr_covmean = eigenvalues.sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def location_statistics(feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(C,)`` and unbiased covariance ``(C, C)`` over positions of one ``(C, H, W)`` map."""
    if feature_map.ndim != 3:
        raise ValueError(f"feature_map must be (C, H, W), got shape {tuple(feature_map.shape)}")
    rows = feature_map.double().flatten(1).T  # (H*W, C): one sample per position
    if rows.shape[0] < 2:
        raise UserError("SIFID needs a feature map with at least 2 positions (image too small)")
    return rows.mean(dim=0), torch.cov(rows.T)


@torch.no_grad()
def sifid(reference: torch.Tensor, images: torch.Tensor, inception: InceptionV3, dims: int = 64) -> torch.Tensor:
    """SIFID between one reference image and each of ``images`` (lower is better).

    Args:
        reference: ``(3, H, W)`` or ``(1, 3, H, W)`` float in ``[-1, 1]``.
        images: ``(N, 3, H', W')`` float in ``[-1, 1]`` (any size >= 8 px; no resizing, as SinGAN).
            Grey ``(1, H, W)`` / ``(N, 1, H, W)`` tensors are repeated to RGB.
        inception: torchvision-layout ``InceptionV3``.
        dims: 64 (``block0``, default) or 192 (``block1``) feature channels.

    Returns:
        ``(N,)`` float64 SIFID values; Table 1 reports their mean.
    """
    if dims not in (64, 192):
        raise UserError(f"SIFID dims must be 64 or 192 (SinGAN's blocks 0 and 1), got {dims}")
    features = inception.block0 if dims == 64 else inception.block1
    # Grey tensors become RGB the way grey files do when loaded (PIL's L -> RGB).
    reference, images = as_rgb(reference, "SIFID reference"), as_rgb(images, "SIFID images")
    if reference.shape[0] != 1:
        raise UserError("reference must be one (3, H, W) image and images (N, 3, H, W)")
    device = next(inception.parameters()).device
    mu_r, sigma_r = location_statistics(features(reference.to(device, torch.float32))[0])
    values = []
    for image in images:
        mu, sigma = location_statistics(features(image[None].to(device, torch.float32))[0])
        values.append(frechet_distance(mu_r, sigma_r, mu, sigma))
    return torch.tensor(values, dtype=torch.float64)
