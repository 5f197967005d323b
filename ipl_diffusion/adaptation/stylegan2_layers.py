"""StyleGAN-NADA's choice of the layers GAN-IPL trains: fixed sets by ``phase``, or the
adaptive selection (a W+ probe of the global CLIP loss), with the row-to-layer mapping fixed.

See :mod:`ipl_diffusion.adaptation.stylegan2` ("Which layers train", "The off-by-one fix").
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ipl_diffusion.configs import PHASES
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
from ipl_diffusion.errors import UserError



def default_auto_layer_k(generator: StyleGAN2Generator) -> int:
    """IPL ``--auto_compute``: ``int(2 * (2 * log2(size) - 2) / 3)`` = ``int(2 * n_latent / 3)``."""
    return int(2 * generator.n_latent / 3)


def nada_training_layers(generator: StyleGAN2Generator, phase: Optional[str] = None) -> list[str]:
    """Module names NADA trains for ``phase`` (``SG2Generator.get_training_layers``).

    ``None`` -> ``input``, ``conv1`` and every ``convs.*``; ``"all"`` -> every top-level child
    (mapping and ToRGB included); ``"texture"`` -> + ``convs[2:10]``; ``"shape"`` ->
    + ``convs[0:2]``; ``"no_fine"`` -> + ``convs[:10]``; ``"shape_expanded"`` -> + ``convs[0:3]``.
    """
    if phase not in PHASES:
        raise UserError(f"phase must be one of {PHASES}, got {phase!r}")
    if phase == "all":
        return [name for name, _ in generator.named_children()]
    n = len(generator.convs)
    ranges = {None: range(n), "texture": range(2, min(10, n)), "shape": range(min(2, n)), "no_fine": range(min(10, n)), "shape_expanded": range(min(3, n))}
    return ["input", "conv1"] + [f"convs.{k}" for k in ranges[phase]]


def set_trainable(generator: torch.nn.Module, module_names: Sequence[str]) -> None:
    """Freeze every parameter, then unfreeze the named sub-modules (NADA ``freeze/unfreeze_layers``)."""
    generator.requires_grad_(False)
    for name in module_names:
        generator.get_submodule(name).requires_grad_(True)


def trainable_module_names(generator: StyleGAN2Generator, w_plus_rows: Sequence[int], train_to_rgb: bool = False, compat: bool = False) -> list[str]:
    """Map selected W+ rows to the modules to unfreeze (the corrected NADA mapping).

    ``compat=True`` gives the upstream ``[conv1, to_rgb1, *convs][j]`` mapping (off by one).
    """
    if compat:
        table = ["conv1", "to_rgb1"] + [f"convs.{k}" for k in range(len(generator.convs))]
        return [table[j] for j in w_plus_rows if j < len(table)]
    names = []
    for j in w_plus_rows:
        for name in generator.latent_index_modules(j):
            if (train_to_rgb or "to_rgb" not in name) and name not in names:
                names.append(name)
    return names


def candidate_rows(generator: StyleGAN2Generator, train_to_rgb: bool = False, compat: bool = False) -> list[int]:
    """W+ rows that can be selected: those driving a trainable StyledConv (or any row with ToRGB)."""
    if compat or train_to_rgb:
        return list(range(generator.n_latent))
    return [j for j in range(generator.n_latent) if any("to_rgb" not in n for n in generator.latent_index_modules(j))]


def select_layers(
    generator: StyleGAN2Generator,
    w: torch.Tensor,
    global_loss: Callable[[torch.Tensor], torch.Tensor],
    k: int,
    iterations: int = 1,
    lr: float = 0.01,
    train_to_rgb: bool = False,
    compat: bool = False,
    chunk_size: Optional[int] = None,
    randomize_noise: bool = True,
    global_batch: Optional[int] = None,
) -> tuple[list[str], torch.Tensor]:
    """NADA's adaptive layer selection (``determine_opt_layers``), with the index fix.

    Args:
        generator: the trainable generator ``G_t``.
        w: ``(B, style_dim)`` latents from the (frozen) mapping network.
        global_loss: images ``(b, 3, H, W)`` -> scalar loss, a *mean over the images* (NADA:
            ``mean(1 - cos(E_I(x), E_T(target)))``).
        k: how many W+ rows to pick.
        iterations, lr: plain SGD steps on the W+ codes.
        chunk_size: render and back-propagate the ``B`` probes this many at a time. Each code's
            gradient depends only on its own image, so the scores are the same (with fixed
            noise: exactly) while the peak memory is that of ``chunk_size`` images -- the probe
            batch (8 upstream) is otherwise the largest graph of a GAN-IPL step.
        randomize_noise: fresh noise maps per render (upstream) or the fixed ``noises.noise_i``.
        global_batch: the whole probe batch when ``w`` is one process's share of it (default:
            ``B``). Each code then takes the step it would take in the whole batch (``global_loss``
            averages over ``global_batch`` images), so the shares' scores, weighted by their
            sizes and summed, are the whole batch's scores (:meth:`GANIPLTrainer.choose_layers`).
    Returns:
        ``(module names to train, per-row scores (n_latent,) float)``; scores are
        ``mean |w+_after - w+_before|`` over ``w``'s batch and the channels.
    """
    w_init = w.detach().unsqueeze(1).repeat(1, generator.n_latent, 1)
    batch = w_init.shape[0]
    total = global_batch or batch
    chunk = chunk_size or batch
    codes = w_init.clone()
    for _ in range(iterations):
        grads = []
        for start in range(0, batch, chunk):
            part = codes[start : start + chunk].clone().requires_grad_(True)
            image = generator.synthesis(part, randomize_noise=randomize_noise)
            # global_loss averages over its images: rescale each chunk's mean to the (global) batch mean.
            (grad,) = torch.autograd.grad(global_loss(image) * (part.shape[0] / total), part)
            grads.append(grad)
        codes = (codes - lr * torch.cat(grads)).detach()
    scores = (codes - w_init).abs().mean(dim=-1).mean(dim=0)
    return rank_layers(generator, scores, k, train_to_rgb, compat), scores


def rank_layers(generator: StyleGAN2Generator, scores: torch.Tensor, k: int, train_to_rgb: bool = False, compat: bool = False) -> list[str]:
    """The modules consuming the ``k`` candidate W+ rows with the highest ``scores (n_latent,)``
    (ties: ``torch.topk``'s order), in row order."""
    rows = candidate_rows(generator, train_to_rgb, compat)
    k = min(k, len(rows))
    ranked = torch.topk(scores[rows], k).indices.tolist()
    chosen = sorted(rows[i] for i in ranked)
    return trainable_module_names(generator, chosen, train_to_rgb, compat)
