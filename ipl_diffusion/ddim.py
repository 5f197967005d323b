"""Deterministic DDIM decoding and inversion as small pure functions.

All functions read the noise schedule (``alphas_cumprod``, ``final_alpha_cumprod``, the
timestep grid, ``clip_sample``, ``prediction_type``) from a diffusers
:class:`~diffusers.DDIMScheduler` and never build a beta schedule of their own. The update is
written in eps; a v-prediction model's output is converted to eps first (:func:`predict_eps`). They keep the autograd graph (no ``torch.no_grad``
inside) so Stage 2 fine-tuning can back-propagate through a chain of steps; pipelines wrap
them in ``torch.no_grad()`` themselves.

Conventions
-----------
* A *level* is a timestep index whose ``alpha_bar`` the current ``x`` is at. Two sentinel
  levels extend ``[0, T)``: ``-1`` (``alpha_bar = scheduler.final_alpha_cumprod``, i.e. 1 for
  ``set_alpha_to_one=True``: clean images) and ``T`` (``alpha_bar = 0``: pure noise, used only by
  upstream DiffAE's last inversion step).
* A *plan* is a list of ``(model_t, from_level, to_level)``: evaluate eps at ``model_t`` on ``x``
  at ``from_level`` and move ``x`` to ``to_level`` with :func:`ddim_step`. :func:`decode_plan`
  and :func:`inversion_plan` build them; the loops just run them, so the bookkeeping can be
  tested on its own (``tests/test_ddim.py``).

DDIM update (eta = 0; Song et al. 2021, Eq. 12)::

    x0_hat = (x - sqrt(1 - a_from) * eps) / sqrt(a_from)        [clipped, then eps re-derived]
    x_to   = sqrt(a_to) * x0_hat + sqrt(1 - a_to) * eps

Decoding
    ``timesteps`` descending ``t_{N-1} > ... > t_0``; step k evaluates eps at ``t_k`` and moves
    ``t_k -> t_{k-1}`` (``t_0 -> -1``). With ``DDIMScheduler(beta_schedule="linear",
    clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")`` and
    N dividing 1000 this is exactly upstream DiffAE's ``render`` / ``ddim_sample_loop`` (clipped
    ``x0_hat``, eps re-derived from it) and equals diffusers'
    ``DDIMScheduler.step(eta=0, use_clipped_model_output=True)`` (tested); we run our own loop
    so that the same code decodes from an intermediate ``t_0`` (DiffusionCLIP) and stays a pure
    function of the scheduler's alphas (``set_timesteps`` mutates the scheduler).

Inversion (``x0 -> x_t``), two variants evaluating the network at the same timesteps
``t_0 < ... < t_{N-1}``, in the same order:

* ``variant="mirror"`` (default): step k moves ``t_{k-1} -> t_k`` (``-1 -> t_0`` first), i.e. it
  is the algebraic inverse of decoding step k given the same eps; ``x_T`` ends at the level the
  decoder starts from. This makes ``decode(invert(x0))`` exact whenever eps does not depend on
  ``x`` (``tests/test_ddim.py`` checks both) and first-order accurate otherwise. It matches diffusers'
  ``DDIMInverseScheduler`` bookkeeping but additionally applies the scheduler's x0 clipping with
  eps re-derived, as upstream does.
* ``variant="diffae"``: upstream DiffAE's ``ddim_reverse_sample_loop`` step for step (upstream
  computes in float64 numpy alphas under fp16 autocast, so expect ~1e-3 differences): ``x0`` is
  taken to be at level ``t_0`` (``alpha_bar = 0.9999``), step k moves ``t_k -> t_{k+1}`` using eps
  at the *source* ``t_k``, and when inverting to the full T the last step jumps to
  ``alpha_bar = 0`` (so ``x_T`` is the re-derived eps). To an intermediate ``end_timestep`` it is
  DiffusionCLIP's inversion (``N - 1`` steps over ``linspace(0, t0, N)``, source-timestep eps;
  DiffusionCLIP does not clip, so pass ``clip_sample=False``). Its shifted levels make
  ``decode(invert(x0))`` inexact even for an eps that ignores ``x`` (and the final jump to
  ``alpha_bar = 0`` discards the ``sqrt(alpha_bar)`` share of ``x0``), which is why it is not the
  default; for a trained model the two variants differ by ``O(sqrt(1 - alpha_bar(0)))``.
  diffusers' ``DDIMInverseScheduler`` cannot express it: it evaluates the model at the target
  timestep, never jumps to ``alpha_bar = 0`` and uses the raw model output as eps even when it
  clips ``x0_hat``.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ipl_diffusion.errors import UserError

__all__ = [
    "alpha_at",
    "ddim_step",
    "ddim_timesteps",
    "diffae_timesteps",
    "decode_plan",
    "inversion_plan",
    "ddim_decode",
    "ddim_invert",
    "invert_to_t0",
    "decode_from_t0",
    "decode_to_t0",
    "check_t0",
    "predict_eps",
    "prediction_type",
]

Plan = List[Tuple[int, int, int]]


def alpha_at(
    alphas_cumprod: torch.Tensor,
    t: Union[int, torch.Tensor],
    final_alpha_cumprod: float = 1.0,
) -> Union[float, torch.Tensor]:
    """``alpha_bar`` at level ``t``: ``alphas_cumprod[t]`` for ``0 <= t < T``,
    ``final_alpha_cumprod`` for ``t < 0`` and ``0`` for ``t >= T``.

    ``t`` is an int (returns a 0-d tensor) or a ``(B,)`` tensor (returns ``(B,)``).
    """
    num_train = alphas_cumprod.shape[0]
    if not torch.is_tensor(t):
        if t < 0:
            return torch.as_tensor(float(final_alpha_cumprod), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
        if t >= num_train:
            return torch.zeros((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device)
        return alphas_cumprod[t]
    t = t.to(alphas_cumprod.device).long()
    values = alphas_cumprod[t.clamp(0, num_train - 1)]
    values = torch.where(t < 0, torch.full_like(values, float(final_alpha_cumprod)), values)
    return torch.where(t >= num_train, torch.zeros_like(values), values)


def _bcast(a, x: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a).to(device=x.device, dtype=x.dtype)
    return a.reshape(-1, *([1] * (x.ndim - 1))) if a.ndim else a


def ddim_step(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: Union[int, torch.Tensor],
    t_next: Union[int, torch.Tensor],
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: float = 1.0,
    clip_sample_range: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM move of ``x_t`` from level ``t`` to level ``t_next`` (either direction).

    Args:
        eps: predicted noise, same shape as ``x_t``.
        x_t: current sample at level ``t``, any shape ``(B, ...)``; its dtype is the compute dtype.
        t, t_next: levels (int, or ``(B,)`` tensors for per-sample levels); ``-1`` means
            ``final_alpha_cumprod`` (clean), ``T`` means ``alpha_bar = 0`` (see :func:`alpha_at`).
        alphas_cumprod: the scheduler's ``alphas_cumprod`` ``(T,)``.
        final_alpha_cumprod: ``alpha_bar`` of level ``-1`` (the scheduler's ``final_alpha_cumprod``).
        clip_sample_range: if set, ``x0_hat`` is clamped to ``[-r, r]`` and eps re-derived from
            the clamped ``x0_hat`` (upstream DiffAE, diffusers ``use_clipped_model_output=True``).

    Returns:
        ``(x_next, x0_hat)`` in the dtype of ``x_t``. The update itself runs in at least float32:
        in bfloat16, ``alpha_bar = 0.9999`` would round to 1. Differentiable in ``eps`` and ``x_t``.
    """
    out_dtype = x_t.dtype
    compute = torch.promote_types(out_dtype, torch.float32)
    x_t, eps = x_t.to(compute), eps.to(compute)
    a_t = _bcast(alpha_at(alphas_cumprod, t, final_alpha_cumprod), x_t)
    a_next = _bcast(alpha_at(alphas_cumprod, t_next, final_alpha_cumprod), x_t)
    x0_hat = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if clip_sample_range is not None:
        x0_hat = x0_hat.clamp(-clip_sample_range, clip_sample_range)
        # eps re-derived from the clipped x0_hat; undefined (and unnecessary) at alpha_bar = 1
        # where x0_hat == x_t.
        beta_t = 1 - a_t
        safe = beta_t > 0
        eps = torch.where(safe, (x_t - a_t.sqrt() * x0_hat) / beta_t.clamp_min(1e-20).sqrt(), eps)
    x_next = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
    return x_next.to(out_dtype), x0_hat.to(out_dtype)


def _num_train_timesteps(scheduler) -> int:
    return int(scheduler.config.num_train_timesteps)


def diffae_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> List[int]:
    """Upstream DiffAE's ``space_timesteps(T, "ddimN")`` grid, descending.

    The smallest integer stride ``s`` with ``len(range(0, T, s)) == N``; equals diffusers'
    ``"leading"`` spacing (offset 0) when N divides T, differs otherwise (N=30: stride 34 vs 33).
    """
    for stride in range(1, num_train_timesteps):
        if len(range(0, num_train_timesteps, stride)) == num_inference_steps:
            return list(range(0, num_train_timesteps, stride))[::-1]
    raise UserError(
        f"DiffAE's 'ddim{num_inference_steps}' spacing does not exist for {num_train_timesteps} training steps"
    )


def ddim_timesteps(
    scheduler,
    num_inference_steps: int,
    max_timestep: Optional[int] = None,
) -> List[int]:
    """The descending timestep grid of a DDIM chain.

    * ``max_timestep=None``: the scheduler's own grid (``set_timesteps`` on a copy, so the
      scheduler's ``timestep_spacing`` and ``steps_offset`` apply and it is not mutated).
    * ``max_timestep=t0``: DiffusionCLIP's grid for partial inversion/decoding,
      ``[int(s) for s in linspace(0, 1, N) * t0]`` (``N`` points including ``0`` and ``t0``).

    Raises:
        ValueError: ``num_inference_steps < 1``, a grid outside ``[0, T)``, or repeated
            timesteps (``N > t0 + 1``).
    """
    num_train = _num_train_timesteps(scheduler)
    if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise UserError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}")
    if max_timestep is None:
        copy = type(scheduler).from_config(scheduler.config)
        copy.set_timesteps(int(num_inference_steps))
        grid = [int(t) for t in copy.timesteps]
    else:
        if not 0 <= int(max_timestep) < num_train:
            raise UserError(f"the intermediate timestep must lie in [0, {num_train - 1}]; got {max_timestep}")
        if num_inference_steps > int(max_timestep) + 1:
            raise UserError(
                f"{num_inference_steps} steps do not fit below timestep {max_timestep}: "
                f"use at most {int(max_timestep) + 1} steps"
            )
        grid = [int(s) for s in np.linspace(0, 1, int(num_inference_steps)) * int(max_timestep)][::-1]
    _check_grid(grid, num_train)
    return grid


def _check_grid(grid: Sequence[int], num_train: int) -> None:
    if not grid:
        raise ValueError("empty timestep grid")
    if any(not 0 <= t < num_train for t in grid):
        raise ValueError(
            f"timesteps must lie in [0, {num_train - 1}]; got {list(grid)} "
            "(check the scheduler's steps_offset against num_inference_steps)"
        )
    if any(a <= b for a, b in zip(grid, grid[1:])):
        raise ValueError(f"timesteps must be strictly decreasing; got {list(grid)}")


def decode_plan(timesteps: Sequence[int]) -> Plan:
    """``[(t_k, t_k, t_{k-1}), ...]`` for descending ``timesteps``; the last step goes to ``-1``."""
    timesteps = [int(t) for t in timesteps]
    return [(t, t, timesteps[k + 1] if k + 1 < len(timesteps) else -1) for k, t in enumerate(timesteps)]


def inversion_plan(
    timesteps: Sequence[int],
    variant: str = "mirror",
    to_pure_noise: bool = False,
    num_train_timesteps: int = 1000,
) -> Plan:
    """Inversion steps for the descending decoding grid ``timesteps`` (see the module docstring).

    ``variant="mirror"``: the decode plan reversed with from/to swapped.
    ``variant="diffae"``: source-timestep steps ``t_k -> t_{k+1}``; with ``to_pure_noise`` one
    more step from ``t_{N-1}`` to level ``num_train_timesteps`` (``alpha_bar = 0``).
    """
    ascending = [int(t) for t in timesteps][::-1]
    if variant == "mirror":
        return [(model_t, to, frm) for model_t, frm, to in reversed(decode_plan(timesteps))]
    if variant == "diffae":
        plan = [(t, t, ascending[k + 1]) for k, t in enumerate(ascending[:-1])]
        if to_pure_noise:
            plan.append((ascending[-1], ascending[-1], num_train_timesteps))
        return plan
    raise ValueError(f"variant must be 'mirror' or 'diffae'; got {variant!r}")


PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_type(scheduler) -> str:
    """What the network predicts, from the scheduler config (diffusers' ``prediction_type``).

    Raises:
        ValueError: a type other than ``"epsilon"`` / ``"v_prediction"`` (``"sample"`` is not
            supported: eps derived from an x0 prediction divides by ``sqrt(1 - alpha_bar)``,
            which vanishes at the last decoding step).
    """
    kind = getattr(scheduler.config, "prediction_type", "epsilon") if scheduler is not None else "epsilon"
    if kind not in PREDICTION_TYPES:
        raise UserError(f"prediction_type must be one of {PREDICTION_TYPES}; the scheduler says {kind!r}")
    return kind


def predict_eps(model, x: torch.Tensor, t: int, z_sem: Optional[torch.Tensor], scheduler=None) -> torch.Tensor:
    """Call a noise model as ``model(x, t, z_sem)`` (or ``model(x, t)`` when ``z_sem`` is None)
    and return its noise prediction eps.

    ``t`` is broadcast to a ``(B,)`` long tensor on ``x``'s device. Accepts models returning a
    tensor, a tuple, or a diffusers output with ``.sample``. With a ``scheduler`` whose
    ``prediction_type`` is ``"v_prediction"`` (Salimans & Ho 2022, ``v = sqrt(a) eps -
    sqrt(1 - a) x0`` at ``a = alphas_cumprod[t]``) the output is converted:
    ``eps = sqrt(a) v + sqrt(1 - a) x``. Without a scheduler the output is taken to be eps.
    """
    timestep = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    out = model(x, timestep) if z_sem is None else model(x, timestep, z_sem)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    if prediction_type(scheduler) == "v_prediction":
        a = scheduler.alphas_cumprod[int(t)].to(device=x.device, dtype=torch.float32)
        out = (a.sqrt() * out.float() + (1 - a).sqrt() * x.float()).to(out.dtype)
    return out


def _clip_range(scheduler, clip_sample: Optional[bool]) -> Optional[float]:
    clip = scheduler.config.clip_sample if clip_sample is None else clip_sample
    return float(getattr(scheduler.config, "clip_sample_range", 1.0)) if clip else None


def _check_input(model, x: torch.Tensor) -> None:
    factor = getattr(model, "downsampling_factor", None)
    if factor and x.ndim == 4 and (x.shape[-1] % factor or x.shape[-2] % factor):
        raise ValueError(
            f"{type(model).__name__} needs H and W divisible by {factor}; got {x.shape[-2]}x{x.shape[-1]}. "
            "Resize or crop the images first (ipl_diffusion.images.load_image)."
        )


def _run_plan(model, x, z_sem, scheduler, plan: Plan, clip_range, progress_bar, call=None) -> torch.Tensor:
    """Run ``plan``'s DDIM steps from ``x``. ``call(model, x, t, z_sem) -> eps`` replaces
    :func:`predict_eps` (a trainer wraps it in gradient checkpointing)."""
    alphas = scheduler.alphas_cumprod.to(x.device)
    final = float(scheduler.final_alpha_cumprod)
    steps: Iterable = progress_bar(plan) if progress_bar is not None else plan
    for model_t, frm, to in steps:
        if call is None:
            eps = predict_eps(model, x, model_t, z_sem, scheduler)
        else:
            eps = call(model, x, model_t, z_sem)
        x, _ = ddim_step(eps.to(x.dtype), x, frm, to, alphas, final, clip_range)
    return x


def _resolve_grid(scheduler, num_inference_steps, max_timestep, timesteps) -> List[int]:
    if timesteps is not None:
        grid = [int(t) for t in timesteps]
        _check_grid(grid, _num_train_timesteps(scheduler))
        return grid
    return ddim_timesteps(scheduler, num_inference_steps, max_timestep)


def ddim_decode(
    unet,
    x_t: torch.Tensor,
    z_sem: Optional[torch.Tensor],
    scheduler,
    num_inference_steps: int,
    start_timestep: Optional[int] = None,
    clip_sample: Optional[bool] = None,
    timesteps: Optional[Sequence[int]] = None,
    progress_bar: Optional[Callable[[Iterable], Iterable]] = None,
) -> torch.Tensor:
    """Deterministic DDIM decoding ``x_t -> x0`` conditioned on ``z_sem`` (eta = 0).

    Args:
        unet: noise model called as ``unet(x, t, z_sem)`` (``unet(x, t)`` if ``z_sem`` is None, e.g.
            the latent net); it predicts eps or v as the scheduler's ``prediction_type`` says
            (see :func:`predict_eps`).
        x_t: ``(B, C, H, W)`` (or ``(B, D)`` for latents) at the first grid level. Keep it
            float32 for a half-precision model: the model computes in its own dtype, the chain
            stays in ``x_t``'s.
        z_sem: ``(B, 512)`` semantic code or None.
        scheduler: a diffusers ``DDIMScheduler`` (alphas, grid, ``clip_sample``, final alpha).
        num_inference_steps: network evaluations.
        start_timestep: decode from this intermediate timestep (DiffusionCLIP's ``t0``) on the
            grid ``linspace(0, t0, N)``; None decodes from the full T on the scheduler's grid.
        clip_sample: override the scheduler's ``clip_sample``.
        timesteps: explicit descending grid (e.g. :func:`diffae_timesteps`), overrides the above.
        progress_bar: wraps the step list, e.g. a pipeline's ``self.progress_bar`` or ``tqdm``.

    Returns:
        ``x0`` with the shape and dtype of ``x_t`` (images in ``[-1, 1]`` when clipping is on).

    Raises:
        ValueError: bad step counts / grids, an unsupported ``prediction_type``, or an image size
            the UNet cannot take (before any forward pass).
    """
    _check_input(unet, x_t)
    prediction_type(scheduler)
    grid = _resolve_grid(scheduler, num_inference_steps, start_timestep, timesteps)
    return _run_plan(unet, x_t, z_sem, scheduler, decode_plan(grid), _clip_range(scheduler, clip_sample), progress_bar)


def ddim_invert(
    unet,
    x0: torch.Tensor,
    z_sem: Optional[torch.Tensor],
    scheduler,
    num_inference_steps: int,
    end_timestep: Optional[int] = None,
    variant: str = "mirror",
    clip_sample: Optional[bool] = None,
    timesteps: Optional[Sequence[int]] = None,
    progress_bar: Optional[Callable[[Iterable], Iterable]] = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion ``x0 -> x_t`` conditioned on ``z_sem`` (DiffAE's stochastic code).

    Args:
        unet, z_sem, scheduler, clip_sample, timesteps, progress_bar: as in :func:`ddim_decode`.
        x0: clean images ``(B, C, H, W)`` in ``[-1, 1]``.
        num_inference_steps: size of the timestep grid (``ddim_decode`` with the same arguments
            undoes the inversion).
        end_timestep: stop at this intermediate timestep (DiffusionCLIP's ``t0``); None inverts
            to the full T.
        variant: ``"mirror"`` (default; exact algebraic inverse of :func:`ddim_decode`'s steps)
            or ``"diffae"`` (upstream ``ddim_reverse_sample_loop`` / DiffusionCLIP, see the
            module docstring).

    Returns:
        ``x_t`` with the shape and dtype of ``x0``, to be decoded with :func:`ddim_decode` and
        the same ``num_inference_steps`` / ``start_timestep=end_timestep``.
    """
    _check_input(unet, x0)
    prediction_type(scheduler)
    grid = _resolve_grid(scheduler, num_inference_steps, end_timestep, timesteps)
    plan = inversion_plan(
        grid,
        variant=variant,
        to_pure_noise=end_timestep is None,
        num_train_timesteps=_num_train_timesteps(scheduler),
    )
    return _run_plan(unet, x0, z_sem, scheduler, plan, _clip_range(scheduler, clip_sample), progress_bar)


# ------------------------------------------------------------ DiffusionCLIP's partial chain
# Diff-IPL edits an image by inverting it to ``t0`` (not to T: ``t0`` sets how far an image may
# move), then decoding ``x_{t0}`` with the adapted UNet (DiffusionCLIP). Both directions use
# the grid ``linspace(0, t0, N)`` and no x0 clipping: clipping would zero the gradient of
# every saturated pixel, and training and inference must decode the same way.


def invert_to_t0(unet, x0, z_sem, scheduler, t0: int, num_steps: int, progress_bar=None) -> torch.Tensor:
    """``x0 -> x_{t0}`` ``(B, 3, H, W)``: DiffusionCLIP's deterministic inversion
    (``num_steps - 1`` steps over ``linspace(0, t0, num_steps)``, eps at the *source*
    timestep -- the ``"diffae"`` variant of :func:`ddim_invert` -- no clipping)."""
    return ddim_invert(unet, x0, z_sem, scheduler, num_steps, end_timestep=t0, variant="diffae",
                       clip_sample=False, progress_bar=progress_bar)


def decode_from_t0(unet, x_t0, z_sem, scheduler, t0: int, num_steps: int, progress_bar=None, call=None) -> torch.Tensor:
    """``x_{t0} -> x0`` ``(B, 3, H, W)`` in ``num_steps`` steps over ``linspace(0, t0,
    num_steps)``, no clipping. Keeps the autograd graph (Stage 2's full chain
    back-propagates through it); ``call`` as in :func:`_run_plan`."""
    plan = decode_plan(ddim_timesteps(scheduler, num_steps, t0))
    return _run_plan(unet, x_t0, z_sem, scheduler, plan, None, progress_bar, call)


def decode_to_t0(unet, x_T, z_sem, scheduler, t0: int, num_steps: int, progress_bar=None) -> torch.Tensor:
    """Pure noise ``x_T -> x_{t0}`` on the scheduler's ``num_steps`` grid above ``t0``, with
    its clipping: unconditional sampling, where the adapted UNet takes over at ``t0``."""
    grid = [t for t in ddim_timesteps(scheduler, num_steps) if t > t0] + [t0]
    plan = decode_plan(grid)[:-1]  # stop at level t0
    return _run_plan(unet, x_T, z_sem, scheduler, plan, _clip_range(scheduler, None), progress_bar)


def check_t0(t0: int, scheduler) -> int:
    """``t0`` as an int; ``UserError`` unless ``0 < t0 < num_train_timesteps``."""
    from ipl_diffusion.errors import UserError

    total = _num_train_timesteps(scheduler)
    if int(t0) != t0 or not 0 < int(t0) < total:
        raise UserError(f"t0 must be an integer in 1..{total - 1} (the scheduler's timesteps), got {t0}")
    return int(t0)
