"""Structural Consistency Score (RSSA, Xiao et al., CVPR 2022), as IPL's Table 1 uses it.

For a pair (source image s, adapted image t generated from the same latent), HED edge maps
``E_s, E_t`` in ``[0, 1]`` are compared with ``2 * sum(E_s * E_t) / sum(E_s^2 + E_t^2)``
(a Dice / Sørensen similarity of soft edge maps; 1 for identical maps). SCS is the mean over
pairs (500 pairs in the AIR protocol, ``evaluation/scs_score.py``).

Upstream writes the edge maps to 8-bit PNGs and reads them back before comparing, which
truncates each value to a multiple of 1/255; ``quantize=True`` (default) reproduces that step.
"""

from __future__ import annotations

import torch

from ipl_diffusion.errors import UserError
from .hed import HED


def edge_similarity(edges_source: torch.Tensor, edges_adapted: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``2 <s, t> / (|s|^2 + |t|^2)`` per pair of edge maps ``(B, 1, H, W)`` in ``[0, 1]``.

    Two all-zero maps (no edges at all) count as identical (similarity 1).
    """
    if edges_source.shape != edges_adapted.shape:
        raise UserError(f"edge maps differ in shape: {tuple(edges_source.shape)} vs {tuple(edges_adapted.shape)}")
    s, t = edges_source.double().flatten(1), edges_adapted.double().flatten(1)
    numerator, denominator = 2 * (s * t).sum(1), (s * s + t * t).sum(1)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.ones_like(numerator))


def quantize_edges(edges: torch.Tensor) -> torch.Tensor:
    """What a round trip through an 8-bit PNG does upstream: ``floor(clip(e, 0, 1) * 255) / 255``."""
    return torch.floor(edges.clamp(0, 1) * 255.0) / 255.0


@torch.no_grad()
def structural_consistency(source_images: torch.Tensor, adapted_images: torch.Tensor, hed: HED,
                           batch_size: int = 10, quantize: bool = True) -> torch.Tensor:
    """Per-pair SCS ``(N,)`` float64 for paired images ``(N, 3, H, W)`` in ``[-1, 1]`` (higher is better).

    Raises:
        ValueError: the two sets differ in shape (pairs must match image for image).
    """
    if source_images.shape != adapted_images.shape or source_images.ndim != 4:
        raise UserError(
            f"SCS needs paired images of one shape (N, 3, H, W), got {tuple(source_images.shape)} "
            f"and {tuple(adapted_images.shape)}"
        )
    device = next(hed.parameters()).device
    values = []
    for start in range(0, source_images.shape[0], batch_size):
        edges = [hed(x[start:start + batch_size].to(device, torch.float32)) for x in (source_images, adapted_images)]
        if quantize:
            edges = [quantize_edges(e) for e in edges]
        values.append(edge_similarity(*edges).cpu())
    return torch.cat(values)
