"""Real-image projection into a StyleGAN2 generator's W / W+ space, by optimisation.

The paper translates real images with ReStyle + e4e (Alaluf et al. 2021, Tov et al. 2021); those encoder
weights are not available offline, so this module finds the latent by gradient descent on
the reconstruction, in the manner of rosinality's ``projector.py`` (Karras et al. 2020,
appendix D): start at the mean ``w`` (or at an encoder's guess), Adam with a warm-up /
cosine ramp-down learning rate, and Gaussian noise added to the latent early on (decaying to
zero by 75 % of the steps) so the search does not stall in the first local minimum. The
noise maps stay at the generator's fixed ``noises.noise_i`` so the result is deterministic
and reusable with another generator (the adapted one) that shares them.

Loss = ``pixel_weight * MSE(G(w), x)`` + ``perceptual_weight * perceptual_loss(G(w), x)``
(LPIPS when its weights are on disk: :func:`lpips_loss`).

Encoder hook: ``encoder(images) -> w (N, D) | w+ (N, n_latent, D)`` (an e4e / ReStyle wrapper
a user has). With ``num_steps=0`` its output is used as is; otherwise it initialises the
optimisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from ipl_diffusion.errors import UserError

SPACES = ("w", "w+")


@dataclass
class ProjectionResult:
    """``latents``: W+ ``(N, n_latent, D)`` (a W projection is repeated over rows);
    ``images``: reconstructions ``(N, 3, size, size)`` in [-1, 1]; ``losses``: per-step totals."""

    latents: torch.Tensor
    images: torch.Tensor
    losses: list = field(default_factory=list)


def lpips_loss(backbone_weights, lin_weights=None, net: str = "alex") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """LPIPS distance ``(x, y in [-1, 1]) -> scalar`` from local weight files
    (``ipl_diffusion.metrics.lpips``); raises ``FileNotFoundError`` naming the missing file."""
    from ipl_diffusion.metrics.lpips import LPIPS

    model = LPIPS.from_pretrained(backbone_weights, lin_weights, net=net, metric="LPIPS (projection)").eval().requires_grad_(False)
    model.check_range = False  # the generator's outputs are unclamped and may leave [-1, 1] slightly

    def loss(x, y):
        model.to(x.device)
        return model(x, y).mean()

    return loss


def _learning_rate(t: float, base: float, rampdown: float = 0.25, rampup: float = 0.05) -> float:
    ramp = min(1.0, (1.0 - t) / rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    return base * ramp * min(1.0, t / rampup)


def project(
    generator,
    images: torch.Tensor,
    space: str = "w+",
    num_steps: int = 300,
    learning_rate: float = 0.1,
    perceptual_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    perceptual_weight: float = 1.0,
    noise_strength: float = 0.05,
    encoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    n_mean_latent: int = 4096,
    seed: int = 0,
    progress_bar: Optional[Callable[[Iterable], Iterable]] = None,
) -> ProjectionResult:
    """Find latents whose images reproduce ``images`` (pixel MSE, plus a perceptual loss).

    Args:
        generator: a :class:`~ipl_diffusion.models.stylegan2.StyleGAN2Generator` (not modified).
        images: ``(N, 3, H, W)`` float in [-1, 1]; resized (antialiased) to the generator's size.
        space: ``"w"`` (one ``w`` per image, robust, what editing needs) or ``"w+"`` (one per
            layer; closer reconstructions).
        num_steps: optimisation steps (0 with an ``encoder``: encoder output only).
        learning_rate: Adam's peak learning rate (rosinality: 0.1).
        perceptual_loss: optional ``(x, y) -> scalar`` (e.g. :func:`lpips_loss`), weighted by
            ``perceptual_weight`` next to the pixel MSE.
        noise_strength: latent noise at step 0, in units of the std of ``w`` (decays to 0).
        encoder: optional ``images -> w (N, D) | w+ (N, n_latent, D)``.
        n_mean_latent: samples of ``w`` that give its mean (the start) and std (the noise scale).
        seed: seeds the latent noise (the result is deterministic for a given input).
        progress_bar: wraps the step range, e.g. a pipeline's ``self.progress_bar`` or ``tqdm``.
    Returns:
        :class:`ProjectionResult`.
    Raises:
        UserError: bad ``space``, image shape, ``num_steps=0`` without an encoder, an encoder
            output of the wrong shape, or a non-finite loss.
    """
    _check_projection(images, space, num_steps, encoder)
    size, n_latent = generator.size, generator.n_latent
    target = images.to(generator.device, generator.dtype)
    if target.shape[-2:] != (size, size):
        target = F.interpolate(target, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    rng = torch.Generator().manual_seed(seed)
    init, w_std = _start(generator, target, encoder, n_mean_latent, rng)
    # The latent is optimised in float32 whatever the generator's dtype: Adam's state and the
    # step-0 noise overflow or round away in float16.
    latent = (init[:, :1].clone() if space == "w" else init.clone()).requires_grad_(True)
    noises = [getattr(generator.noises, f"noise_{i}") for i in range(generator.num_layers)]

    def render(code):
        w_plus = code.expand(-1, n_latent, -1) if space == "w" else code
        return generator(w_plus.to(generator.dtype), input_is_latent=True, noise=noises)[0]

    def loss_of(image):
        loss = F.mse_loss(image.float(), target.float())
        if perceptual_loss is not None and perceptual_weight:
            loss = loss + perceptual_weight * perceptual_loss(image, target)
        return loss

    jitter = lambda t: torch.randn(latent.shape, generator=rng).to(latent) * float(w_std) * noise_strength * max(0.0, 1.0 - t / 0.75) ** 2  # noqa: E731
    losses = _optimise(latent, render, loss_of, jitter, num_steps, learning_rate, progress_bar)
    with torch.no_grad():
        final = latent.detach()
        w_plus = (final.expand(-1, n_latent, -1).clone() if space == "w" else final).to(generator.dtype)
        image = render(final)
    return ProjectionResult(latents=w_plus, images=image, losses=losses)


def _check_projection(images, space, num_steps, encoder):
    if space not in SPACES:
        raise UserError(f"space must be one of {SPACES}, got {space!r}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UserError(f"images must be a (N, 3, H, W) tensor in [-1, 1], received {shape}")
    if num_steps < 0 or (num_steps == 0 and encoder is None):
        raise UserError(f"num_steps must be >= 1 (or 0 with an encoder), got {num_steps}")


@torch.no_grad()
def _start(generator, target, encoder, n_mean_latent, rng):
    """``(initial W+ codes (N, n_latent, D), std of w)``, both float32: the encoder's codes, else mean ``w``."""
    device, dtype, n, n_latent, dim = generator.device, generator.dtype, target.shape[0], generator.n_latent, generator.style_dim
    w_samples = generator.get_latent(torch.randn(n_mean_latent, dim, generator=rng).to(device, dtype))
    # Statistics in float32: in float16 the sum of n_mean_latent * dim squares overflows to inf.
    w_samples = w_samples.float()
    w_mean = w_samples.mean(0, keepdim=True)
    w_std = ((w_samples - w_mean).pow(2).sum() / n_mean_latent).sqrt()
    if encoder is None:
        return w_mean.unsqueeze(1).repeat(n, n_latent, 1), w_std
    init = encoder(target).to(device, torch.float32)
    if init.shape == (n, dim):
        init = init.unsqueeze(1).repeat(1, n_latent, 1)
    if init.shape != (n, n_latent, dim):
        raise UserError(f"encoder returned {tuple(init.shape)}; expected ({n}, {dim}) or ({n}, {n_latent}, {dim})")
    return init, w_std


def _optimise(latent, render, loss_of, jitter, num_steps, learning_rate, progress_bar):
    """rosinality's projector loop: Adam with a cosine ramp of the lr and decaying latent noise."""
    losses = []
    if not num_steps:
        return losses
    optimizer = torch.optim.Adam([latent], lr=learning_rate, betas=(0.9, 0.999))
    steps = range(num_steps)
    for step in progress_bar(steps) if progress_bar is not None else steps:
        t = step / num_steps
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(t, learning_rate)
        loss = loss_of(render(latent + jitter(t)))
        if not torch.isfinite(loss):
            raise UserError(f"projection loss became {loss.item()} at step {step}; lower learning_rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
