"""Diversity / mode-collapse metrics: mean pairwise distance and intra-cluster distance.

Intra-cluster LPIPS (Ojha et al., "Few-shot Image Generation via Cross-domain Correspondence",
CVPR 2021, Sec. 4): generate N images, **assign each to the closest of M cluster centres by
LPIPS distance** (in the paper the centres are the M training images; in zero-shot adaptation,
e.g. the target-domain reference images or M generated images), compute the mean pairwise
LPIPS among the members of each cluster, and average over clusters. A collapsed generator puts
near-identical images into each cluster and scores close to 0. The released code evaluates
only the second step on pre-made clusters; :func:`assign_to_clusters` is the first.

Every function takes a *distance*: any callable ``distance(a, b) -> (B,)`` on paired batches of
images — :class:`~ipl_diffusion.metrics.lpips.LPIPS`, or :class:`FeatureDistance` around any
feature network (e.g. the Shapes CLIP image encoder when no LPIPS weights exist).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ipl_diffusion.errors import UserError
from .lpips import normalize_channels

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FeatureDistance:
    """LPIPS-style distance on an arbitrary feature network (LPIPS' ``lpips=False`` variant).

    ``features(images)`` returns one tensor or a list of tensors, each ``(B, C)`` or
    ``(B, C, H, W)``. Per tensor: unit-normalise over channels, squared difference summed over
    channels, averaged over positions; summed over tensors. For ``(B, D)`` embeddings this is
    ``|u - v|^2 = 2 - 2 cos(u, v)`` in ``[0, 4]``.
    """

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor | Sequence[torch.Tensor]]):
        self.features = features

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = self.features(a), self.features(b)
        if isinstance(fa, torch.Tensor):
            fa, fb = [fa], [fb]
        total = 0
        for x, y in zip(fa, fb):
            if x.ndim == 2:
                x, y = x[:, :, None, None], y[:, :, None, None]
            total = total + (normalize_channels(x.float()) - normalize_channels(y.float())).square().sum(1).mean(dim=(1, 2))
        return total


@torch.no_grad()
def _distances(images_a, images_b, pairs, distance, batch_size):
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        i = torch.tensor([p[0] for p in chunk])
        j = torch.tensor([p[1] for p in chunk])
        out.append(distance(images_a[i], images_b[j]).detach().double().flatten().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _all_pairs(n, max_pairs, generator):
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = torch.randperm(len(pairs), generator=generator)[:max_pairs].tolist()
        pairs = [pairs[k] for k in sorted(keep)]
    return pairs


def mean_pairwise_distance(images: torch.Tensor, distance: Distance, max_pairs: int | None = None,
                           batch_size: int = 16, seed: int = 0) -> float:
    """Mean ``distance`` over all unordered pairs ``i < j`` of ``images`` ``(N, 3, H, W)`` (higher = more diverse).

    ``max_pairs``: evaluate a seeded random subset of the pairs instead of all ``N (N - 1) / 2``.

    Raises:
        ValueError: fewer than 2 images.
    """
    if images.shape[0] < 2:
        raise UserError(f"pairwise diversity needs at least 2 images, got {images.shape[0]}")
    pairs = _all_pairs(images.shape[0], max_pairs, torch.Generator().manual_seed(seed))
    return float(_distances(images, images, pairs, distance, batch_size).mean())


@torch.no_grad()
def assign_to_clusters(images: torch.Tensor, centers: torch.Tensor, distance: Distance, batch_size: int = 16) -> torch.Tensor:
    """``(N,)`` index of the closest centre (lowest ``distance``) for each image; ties -> lowest index.

    Args:
        images: ``(N, 3, H, W)``; centers: ``(M, 3, H, W)``, same size, both in ``[-1, 1]``.
    """
    if centers.shape[0] < 1:
        raise UserError("intra-cluster distance needs at least one cluster centre")
    if images.shape[1:] != centers.shape[1:]:
        raise UserError(f"images {tuple(images.shape[1:])} and centres {tuple(centers.shape[1:])} differ in size")
    pairs = [(i, m) for i in range(images.shape[0]) for m in range(centers.shape[0])]
    d = _distances(images, centers, pairs, distance, batch_size).view(images.shape[0], centers.shape[0])
    return d.argmin(dim=1)


def intra_cluster_distance(images: torch.Tensor, centers: torch.Tensor, distance: Distance,
                           max_pairs_per_cluster: int | None = None, batch_size: int = 16, seed: int = 0) -> dict:
    """Ojha et al.'s intra-cluster diversity (intra-LPIPS when ``distance`` is LPIPS).

    Returns:
        ``{"value": mean over clusters with >= 2 members, "per_cluster": [float | None] * M,
        "sizes": [int] * M, "assignment": (N,) tensor}``. Clusters with fewer than 2 members
        have no pairs; they are reported as ``None`` and left out of the mean.

    Raises:
        ValueError: no cluster receives 2 or more images.
    """
    assignment = assign_to_clusters(images, centers, distance, batch_size)
    generator = torch.Generator().manual_seed(seed)
    per_cluster, sizes = [], []
    for m in range(centers.shape[0]):
        members = (assignment == m).nonzero().flatten()
        sizes.append(int(members.numel()))
        if members.numel() < 2:
            per_cluster.append(None)
            continue
        pairs = [(int(members[i]), int(members[j])) for i, j in _all_pairs(members.numel(), max_pairs_per_cluster, generator)]
        per_cluster.append(float(_distances(images, images, pairs, distance, batch_size).mean()))
    valid = [v for v in per_cluster if v is not None]
    if not valid:
        raise UserError(
            f"intra-cluster distance: no cluster got 2 or more of the {images.shape[0]} images (sizes {sizes}); "
            "generate more images or use fewer centres"
        )
    return {"value": sum(valid) / len(valid), "per_cluster": per_cluster, "sizes": sizes, "assignment": assignment}
