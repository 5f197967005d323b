"""Accelerate plumbing shared by the Stage 2 trainers (Diff-IPL and GAN-IPL).

Both trainers run the same way under ``accelerate launch`` / ``torchrun``:

* one ``Accelerator`` per run, made by :func:`make_accelerator`, which refuses mixed
  precision where it cannot work instead of letting accelerate fall back silently;
* the trained network is *not* wrapped in DDP -- Diff-IPL calls its UNet several times
  before one backward pass, and GAN-IPL changes which layers require a gradient every
  iteration (NADA's layer selection); DDP's reducer supports neither. Gradients are averaged
  instead with one all-reduce per update (:func:`average_gradients`);
* work done once per run (encoding the source images, rendering Stage 1's cache of source
  samples) is split over the processes with :func:`shard_indices` and put back together,
  in the original order, on every process with :func:`gather_in_order`;
* logged values are the mean over the processes (:func:`mean_over_processes`), so the loss
  curve describes the global batch and is the same on every process.

Every function here is a no-op (or the identity) on a single process, and accepts
``accelerator=None`` for callers that run without one.
"""

from __future__ import annotations

import math
import warnings

import torch
from ipl_diffusion.errors import UserError

MIXED_PRECISION = ("no", "fp16", "bf16")


def make_accelerator(mixed_precision: str = "no", device=None):
    """An ``Accelerator`` for Stage 2 that refuses mixed precision where it cannot work.

    Args:
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``.
        device: where the models live (a ``torch.device`` or string); ``"cpu"`` forces the
            CPU even when a GPU exists. ``None``: a GPU when there is one.
    Returns:
        ``accelerate.Accelerator``.
    Raises:
        ValueError: an unknown ``mixed_precision``; ``"fp16"`` without a GPU (fp16 autocast
            exists only on GPUs -- on a CPU accelerate silently runs fp32 while still reporting
            fp16); or this process already made an Accelerator with other options
            (``AcceleratorState`` is a per-process singleton).

    bf16 runs on CPUs but several times slower than fp32 there (measured 4x on the 2-core
    test CPU), so it warns.
    """
    from accelerate import Accelerator

    if mixed_precision not in MIXED_PRECISION:
        raise UserError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    # cpu=True also when there is no GPU: only then does accelerate treat a torchrun /
    # `accelerate launch` multi-process CPU job as MULTI_CPU (gloo) instead of N lone processes.
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    if mixed_precision == "fp16" and cpu:
        raise UserError("mixed_precision='fp16' needs a CUDA GPU; on a CPU use 'no' (or 'bf16', slower)")
    if mixed_precision == "bf16" and cpu:
        warnings.warn("mixed_precision='bf16' on a CPU runs several times slower than fp32", stacklevel=2)
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as err:
        raise UserError(
            f"this process already set up Accelerate with other options ({err}); restart Python to change "
            "mixed precision"
        ) from None


def check_weights_dtype(modules: dict, device) -> None:
    """Refuse half-precision weights where adaptation cannot train them, before any work.

    On a CPU, torch has no float16 kernels for several ops adaptation needs, and mixing a
    half-precision network with the float32 inputs / master weights fails deep in a layer
    (``expected m1 and m2 to have the same dtype``). The command line never loads weights
    that way; a pipeline from ``from_pretrained(..., dtype=torch.float16)`` does.

    Args:
        modules: ``name -> torch.nn.Module`` (``None`` entries are skipped).
        device: where the run computes (``torch.device`` or string).
    Raises:
        UserError: on a CPU, a module with floating-point weights other than float32; the
            message names it, its dtype and what to do instead.
    """
    from ipl_diffusion.errors import UserError

    if torch.device(device).type != "cpu":
        return
    for name, module in modules.items():
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()} if module is not None else set()
        other = sorted(str(d) for d in dtypes - {torch.float32})
        if other:
            raise UserError(
                f"adapt on a CPU needs float32 weights, but the {name}'s are {', '.join(other)} (loaded with "
                "dtype=...?); load the pipeline in float32 (the default) -- half precision is "
                "mixed_precision='fp16' on a CUDA GPU, or 'bf16'"
            )


def average_gradients(parameters, accelerator) -> None:
    """Replace each ``.grad`` by its mean over the processes, with one all-reduce.

    Only parameters that have a gradient take part, so every process must have gradients
    for the same parameters (GAN-IPL keeps its per-iteration layer choice identical on all
    processes for this reason). No-op on a single process or without an accelerator.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def shard_indices(num_items: int, accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(num_items)`` over the processes for :func:`gather_in_order`.

    Returns ``(mine, order)``: ``mine`` are the item indices this process computes (every
    ``world``-th of the list padded by wrapping around to a multiple of ``world``, so that all
    shares have the same length, as ``gather`` needs; a padded item is computed twice and
    used once) and ``order`` the item index of each row of the gathered result. One
    process: ``mine = order = arange(num_items)``.
    """
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    padded = torch.arange(math.ceil(num_items / world) * world) % num_items
    order = torch.cat([padded[r::world] for r in range(world)])
    return padded[rank::world], order


def gather_in_order(local: torch.Tensor, order: torch.Tensor, num_items: int, accelerator=None) -> torch.Tensor:
    """The rows that each process computed for its :func:`shard_indices` share, as one CPU
    tensor ``(num_items, ...)`` in item order, on every process."""
    local = local.contiguous()
    world = accelerator.num_processes if accelerator is not None else 1
    gathered = accelerator.gather(local) if world > 1 else local
    full = torch.empty((num_items, *local.shape[1:]), dtype=local.dtype)
    full[order] = gathered.cpu()
    return full


def mean_over_processes(values: dict, accelerator=None) -> dict:
    """``name -> float`` averaged over the processes (one all-reduce); unchanged on one."""
    if accelerator is None or accelerator.num_processes == 1:
        return values
    names = sorted(values)
    mean = accelerator.reduce(torch.tensor([float(values[k]) for k in names], device=accelerator.device), reduction="mean")
    return dict(zip(names, mean.tolist()))
