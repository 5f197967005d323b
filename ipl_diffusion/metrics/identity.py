"""Identity similarity (ID): cosine similarity of identity embeddings of source/adapted pairs.

Faces (FFHQ rows of Table 1): ArcFace IR-SE50 with the crop used by pSp / DiffusionCLIP's
``IDLoss.extract_feats``: average-pool to 256 x 256 when the image is another size, crop rows
35:223 and columns 32:220 (the face region of an FFHQ-aligned image), average-pool to
112 x 112, embed; ID = dot product of the L2-normalised embeddings.

Other domains (AFHQ rows, where the paper cites a fine-grained recogniser): pass any
``nn.Module`` / callable mapping ``(B, 3, H, W)`` images in ``[-1, 1]`` to ``(B, D)`` features;
they are L2-normalised here.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ipl_diffusion.errors import UserError
from .arcface import IRSE50


class ArcFaceFeatures(nn.Module):
    """pSp/DiffusionCLIP face preprocessing + IR-SE50: ``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, 512)``."""

    def __init__(self, backbone: IRSE50):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (256, 256):
            images = F.adaptive_avg_pool2d(images, (256, 256))
        faces = F.adaptive_avg_pool2d(images[:, :, 35:223, 32:220], (112, 112))
        return self.backbone(faces)


@torch.no_grad()
def identity_similarity(source_images: torch.Tensor, adapted_images: torch.Tensor,
                        features: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 16) -> torch.Tensor:
    """Per-pair cosine similarity ``(N,)`` float64 of ``features`` (higher = identity kept).

    Args:
        source_images, adapted_images: paired ``(N, 3, H, W)`` float in ``[-1, 1]``.
        features: e.g. ``ArcFaceFeatures(IRSE50.from_pretrained(path))``, or any feature extractor.

    Raises:
        ValueError: the sets are not paired one to one (different counts).
    """
    if source_images.shape[0] != adapted_images.shape[0]:
        raise UserError(f"ID needs paired images, got {source_images.shape[0]} source and {adapted_images.shape[0]} adapted")
    param = next(features.parameters(), None) if isinstance(features, nn.Module) else None
    device = param.device if param is not None else torch.device("cpu")
    sims = []
    for start in range(0, source_images.shape[0], batch_size):
        a = features(source_images[start:start + batch_size].to(device, torch.float32))
        b = features(adapted_images[start:start + batch_size].to(device, torch.float32))
        sims.append(F.cosine_similarity(a.double(), b.double(), dim=1).cpu())
    return torch.cat(sims)
