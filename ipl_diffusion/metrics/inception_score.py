"""Inception Score (Salimans et al., NeurIPS 2016), computed the way RSSA and IPL's Table 1 do.

IPL's authors point to ``sbarratt/inception-score-pytorch`` (IPL issue #11); RSSA's ``eval.py``
runs it as: torchvision's ImageNet Inception-v3 with ``transform_input=False`` on images in
``[-1, 1]``, **no resizing** (``resize=False``: 256-px images go in at 256 px), softmax over the
1000 logits, ``splits=5`` consecutive (unshuffled) splits of 1000 samples, and per split
``exp(mean_i KL(p(y|x_i) || p(y)))`` with ``p(y)`` the split's mean prediction; the result is
the mean and the population standard deviation (``np.std``) over splits.

Inception-v3 cannot take images under 75 px (its stride-2 convolutions and pools shrink them
to nothing). Such images -- e.g. the 32-px Shapes models' -- are resized to 299 px first, the
way that script does with ``resize=True`` (``nn.Upsample(size=(299, 299), mode="bilinear")``),
and ``ipl evaluate`` notes it in the IS row.

torchmetrics' ``InceptionScore`` differs (it shuffles before splitting, uses the unbiased
standard deviation and the TF FID network), so it cannot reproduce the table; the formula is
short enough to state here exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ipl_diffusion.errors import UserError
from .inception import InceptionV3
from .inputs import as_rgb

INCEPTION_MIN_SIZE = 75  # the smallest input side Inception-v3 accepts
INCEPTION_SIZE = 299  # Inception-v3's native input size, what the IS script resizes to


def input_size(images: torch.Tensor, resize_to: int | None = None) -> int | None:
    """The side images are resized to before Inception: ``resize_to``, else ``INCEPTION_SIZE``
    for images under ``INCEPTION_MIN_SIZE`` px, else ``None`` (no resizing)."""
    if resize_to is None and min(images.shape[-2:]) < INCEPTION_MIN_SIZE:
        return INCEPTION_SIZE
    return resize_to


def inception_score_from_probs(probs: torch.Tensor, splits: int = 5) -> tuple[float, float]:
    """IS from class probabilities.

    Args:
        probs: ``(N, C)`` rows of ``p(y|x_i)`` (each sums to 1), in sample order.
        splits: number of consecutive splits; split ``k`` is rows
            ``[k * (N // splits), (k + 1) * (N // splits))`` (trailing rows are dropped, as upstream).

    Returns:
        ``(mean, std)`` of ``exp(mean_i KL(p(y|x_i) || p(y)))`` over splits (population std).

    Raises:
        ValueError: fewer samples than splits, or ``splits < 1``.
    """
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {tuple(probs.shape)}")
    n = probs.shape[0]
    if splits < 1 or n < splits:
        raise UserError(f"Inception Score needs at least `splits`={splits} images, got {n}")
    probs = probs.double()
    size = n // splits
    scores = []
    for k in range(splits):
        part = probs[k * size:(k + 1) * size]
        marginal = part.mean(dim=0, keepdim=True)
        # scipy.stats.entropy(pyx, py) = sum pyx * log(pyx / py), with 0 * log 0 = 0
        kl = torch.where(part > 0, part * (part.log() - marginal.log()), torch.zeros_like(part)).sum(dim=1)
        scores.append(kl.mean().exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


@torch.no_grad()
def inception_probs(images: torch.Tensor, inception: InceptionV3, batch_size: int = 50, resize_to: int | None = None):
    """``(N, 1000)`` softmax predictions of ``inception`` for images ``(N, 3, H, W)`` in ``[-1, 1]``.

    ``resize_to``: ``None`` feeds images at their own size (RSSA's ``resize=False``) unless they
    are under 75 px, which are resized to 299 (:func:`input_size`); an int resizes bilinearly
    (``align_corners=False``, like ``nn.Upsample``) first, e.g. 299.
    """
    resize_to = input_size(images, resize_to)
    device = next(inception.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device=device, dtype=torch.float32)
        if resize_to is not None:
            x = F.interpolate(x, size=(resize_to, resize_to), mode="bilinear", align_corners=False)
        out.append(F.softmax(inception(x), dim=1).cpu())
    return torch.cat(out)


def inception_score(images: torch.Tensor, inception: InceptionV3, splits: int = 5, batch_size: int = 50,
                    resize_to: int | None = None) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` of images ``(N, 3, H, W)`` float in ``[-1, 1]`` (higher is better).

    Table 1 protocol: N = 1000 samples, ``splits=5``, ``resize_to=None``, torchvision weights.
    Images under 75 px are resized to 299 px (:func:`input_size`).
    """
    images = as_rgb(images, "Inception Score images")  # grey (N, 1, H, W) as grey files load
    if images.shape[0] < splits:
        raise UserError(f"Inception Score needs at least `splits`={splits} images, got {images.shape[0]}")
    return inception_score_from_probs(inception_probs(images, inception, batch_size, resize_to), splits)
