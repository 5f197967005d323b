"""Diff-IPL: IPL's Stage 2 (Eq. 7-9) on a diffusion autoencoder, with DiffusionCLIP's recipe.

The paper adapts a generator with the adaptive directional CLIP loss (Eq. 7-9): every source
image ``x_i`` gets its own text direction ``ΔT_i = E_T([V_i] target) - E_T([V_i] source)``
from the prompt vectors ``V_i`` that the latent mapper (Stage 1, Eq. 6) produced for it, and
the generator is trained so that the CLIP image direction ``ΔI_i`` between the source and
the adapted image follows ``ΔT_i``. The released code does this for StyleGAN2 only; on a
diffusion model we follow DiffusionCLIP (Kim et al. 2022, https://github.com/gwang-kim/DiffusionCLIP):

1. the source images are encoded once -- ``z_sem`` by the semantic encoder, ``x_{t0}`` by
   deterministic DDIM inversion with the *source* UNet up to ``t0`` (not the full T: ``t0``
   sets how far an image may move) -- and cached;
2. a copy of the source UNet (EMA weights, ``eval()`` so DiffAE's dropout stays off -- the
   DiffusionCLIP code calls ``train()``, which would switch it on here) is fine-tuned so that
   decoding the cached ``x_{t0}`` with it, in ``num_train_steps`` DDIM steps, gives images
   whose CLIP direction from the source image ``x0`` follows ``ΔT_i``;
3. optional L1 and identity regularisers tie each adapted image to its source.

Why ``ΔI_i`` (Eq. 7) is measured from the source image ``x0`` and not from the source UNet's
decoding ``x_rec``: before the first update the trainable UNet *is* the source UNet, so its
decoding equals ``x_rec`` exactly and ``ΔI_i = 0`` for every image. The loss normalises
``ΔI_i``, so its gradient grows like ``1 / |ΔI_i|``: the first gradient was ~10^6 times the
later ones, and Adam's second moment kept that spike for the whole run (every later step was
a fraction of the first). DiffusionCLIP measures ``ΔI`` from ``x0`` (its ``clip_loss_func(x0,
src_txt, x, trg_txt)``), so the first step sees the small but non-zero reconstruction error;
StyleGAN-NADA avoids the exact zero through fresh noise maps in each generator call. The
gradient norm is also clipped (``max_grad_norm``, 1 as in diffusers' training scripts), so
a near-zero ``ΔI_i`` can never again dominate Adam's statistics.

Two gradient modes:

* ``"full_chain"`` (DiffusionCLIP's original fine-tuning): the loss is taken on the final
  decoded image and back-propagated through all ``num_train_steps`` UNet calls (memory grows
  with the number of steps; ``gradient_checkpointing`` trades it for recomputation);
* ``"per_step"`` (DiffusionCLIP's GPU-efficient mode): after every DDIM step the loss is
  taken on that step's ``x̂0`` prediction and the optimiser steps at once; the chain
  continues from the detached state, so one UNet graph is alive at a time. (Unlike the
  upstream code the identity term is computed on the differentiable ``x̂0``, so it does
  contribute a gradient.)

Why the DDIM steps of the training chain are written here rather than taken from a
diffusers scheduler: training needs a differentiable step with DiffusionCLIP's timestep
sequence (``linspace(0, t0, n)``, ending at ``ᾱ = 1``) and without the ``x̂0`` clipping
of DiffAE's sampler (clipping would zero the gradient of every saturated pixel); the step
reads ``alphas_cumprod`` from the pipeline's diffusers ``DDIMScheduler``.

Multi-process training (``accelerate launch``): every process takes its own slice of each
global batch, gradients are averaged with one all-reduce per update, and only the main
process writes (the shared plumbing is :mod:`ipl_diffusion.adaptation.distributed`). The
UNet is *not* wrapped in DDP because the full chain calls it several times before one
backward pass, which DDP's reducer does not support.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ipl_diffusion import checkpointing, ddim

from ipl_diffusion.adaptation.distributed import (
    MIXED_PRECISION,
    average_gradients,
    check_weights_dtype,
    gather_in_order,
    make_accelerator,
    mean_over_processes,
    shard_indices,
)

GRADIENT_MODES = ("full_chain", "per_step")


@dataclass
class Stage2Config:
    """Hyper-parameters of Diff-IPL's Stage 2. Defaults follow DiffusionCLIP's README
    example (``t0`` 400, 40 inversion / 6 training / 40 sampling steps, lr 8e-6, CLIP weight
    3) and the IPL code (batch 2).

    * ``t0``: timestep the sources are inverted to (edit strength; DiffusionCLIP uses 201-601
      of 1000); ``num_inversion_steps`` / ``num_train_steps`` / ``num_inference_steps``: DDIM
      steps of the inversion, of the decoding chain while training, and of outputs.
    * ``iterations``: Stage 2 iterations, each on ``batch_size`` images per process
      (``per_step`` makes ``num_train_steps`` optimiser updates per iteration).
    * ``clip_loss_weight``: weight of Eq. 7-9; ``l1_loss_weight``: mean |adapted - source|;
      ``id_loss_weight``: ``1 - cos`` between identity features of the adapted and the source
      image -- by default DiffAE's semantic codes ``z_sem`` (DiffusionCLIP's ArcFace cannot be
      downloaded offline and suits only faces; pass ``identity_features`` to use another).
    * ``gradient_mode``: ``"full_chain"`` or ``"per_step"`` (module docstring);
      ``gradient_checkpointing``; ``mixed_precision``: ``"no"``, ``"bf16"``, ``"fp16"`` (GPU).
    * ``max_grad_norm``: clip the UNet's gradient norm before each update (1, as diffusers'
      training scripts; ``None`` turns it off -- see the module docstring for why it is on).
    * ``seed``: the run's one seed (Stage 1's mapper and batches, Stage 2's batches).
    * ``checkpointing_steps`` / ``checkpoints_total_limit``: resumable checkpoints;
      ``sample_steps`` / ``num_sample_images``: grids (source | reconstruction | adapted).
    """

    t0: int = 400
    num_inversion_steps: int = 40
    num_train_steps: int = 6
    num_inference_steps: int = 40
    learning_rate: float = 8e-6
    iterations: int = 300
    batch_size: int = 2
    clip_loss_weight: float = 3.0
    l1_loss_weight: float = 0.0
    id_loss_weight: float = 0.0
    gradient_mode: str = "full_chain"
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = 2
    sample_steps: int | None = None
    num_sample_images: int = 8

    def __post_init__(self):
        if self.gradient_mode not in GRADIENT_MODES:
            raise ValueError(f"gradient_mode must be one of {GRADIENT_MODES}, got {self.gradient_mode!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        for name in ("num_inversion_steps", "num_train_steps", "num_inference_steps", "iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):  # NaN fails both
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        for name in ("clip_loss_weight", "l1_loss_weight", "id_loss_weight"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict) -> "Stage2Config":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# ------------------------------------------------------------------------ DDIM chain


def check_t0(t0: int, scheduler) -> int:
    """``t0`` as an int, or ``ValueError`` unless ``0 < t0 < num_train_timesteps``."""
    total = int(scheduler.config.num_train_timesteps)
    if int(t0) != t0 or not 0 < int(t0) < total:
        raise ValueError(f"t0 must be an integer in 1..{total - 1} (the scheduler's timesteps), got {t0}")
    return int(t0)


def invert_to_t0(unet, x0, z_sem, scheduler, t0, num_steps, progress_bar=None):
    """``x0 -> x_{t0}``: DiffusionCLIP's deterministic inversion (``num_steps - 1`` steps over
    ``linspace(0, t0, num_steps)``, eps at the *source* timestep, no clipping)."""
    return ddim.ddim_invert(
        unet, x0, z_sem, scheduler, num_steps, end_timestep=t0, variant="diffae", clip_sample=False,
        progress_bar=progress_bar,
    )


def decode_from_t0(unet, x_t0, z_sem, scheduler, t0, num_steps, progress_bar=None, call=None):
    """``x_{t0} -> x0`` in ``num_steps`` DDIM steps over ``linspace(0, t0, num_steps)``.

    Keeps the autograd graph (Stage 2's full chain back-propagates through it). No x0
    clipping, as in DiffusionCLIP: clipping would zero the gradient of saturated pixels, and
    training and inference must decode the same way. ``call(unet, x, t, z_sem) -> eps``
    lets the trainer checkpoint whole UNet calls; by default it is :func:`ddim.predict_eps`
    with the scheduler's ``prediction_type``.
    """
    call = call or functools.partial(ddim.predict_eps, scheduler=scheduler)
    alphas = scheduler.alphas_cumprod.to(x_t0.device)
    final = float(scheduler.final_alpha_cumprod)
    plan = ddim.decode_plan(ddim.ddim_timesteps(scheduler, num_steps, t0))
    x = x_t0
    for model_t, level, next_level in progress_bar(plan) if progress_bar is not None else plan:
        x, _ = ddim.ddim_step(call(unet, x, model_t, z_sem).to(x.dtype), x, level, next_level, alphas, final)
    return x


def decode_to_t0(unet, x_T, z_sem, scheduler, t0, num_steps, progress_bar=None):
    """Pure noise ``x_T -> x_{t0}`` on the scheduler's grid above ``t0`` (with its clipping),
    for unconditional sampling: the adapted UNet takes over at ``t0``."""
    grid = [t for t in ddim.ddim_timesteps(scheduler, num_steps) if t > t0] + [t0]
    plan = ddim.decode_plan(grid)[:-1]  # stop at level t0
    alphas = scheduler.alphas_cumprod.to(x_T.device)
    clip = float(scheduler.config.get("clip_sample_range", 1.0)) if scheduler.config.clip_sample else None
    x = x_T
    for model_t, level, next_level in progress_bar(plan) if progress_bar is not None else plan:
        eps = ddim.predict_eps(unet, x, model_t, z_sem, scheduler)
        x, _ = ddim.ddim_step(eps.to(x.dtype), x, level, next_level, alphas, float(scheduler.final_alpha_cumprod), clip)
    return x


# -------------------------------------------------------------------------- the cache


@torch.no_grad()
def encode_sources(
    semantic_encoder,
    source_unet,
    scheduler,
    images: torch.Tensor,
    t0: int,
    num_inversion_steps: int,
    batch_size: int = 8,
    accelerator=None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Encode the source images once (step 1 of the recipe).

    Args:
        images: ``(N, 3, H, W)`` float in ``[-1, 1]`` (any device).
    Returns:
        CPU float32 tensors: ``x0`` (the inputs: the source images of the CLIP direction
        ``ΔI``, as in DiffusionCLIP -- see the module docstring), ``z_sem (N, 512)`` and
        ``x_t0`` (inversion to ``t0`` with the source UNet). With several processes each
        computes every ``world``-th item and the results are gathered, so every process ends
        with the whole cache.
    """
    from tqdm.auto import tqdm

    device = next(source_unet.parameters()).device
    n = images.shape[0]
    mine, order = shard_indices(n, accelerator)
    parts = {"z_sem": [], "x_t0": []}
    main = accelerator is None or accelerator.is_local_main_process
    for start in tqdm(range(0, len(mine), batch_size), desc="Encoding source images", disable=not (progress and main)):
        x0 = images[mine[start : start + batch_size]].to(device, torch.float32)
        z_sem = semantic_encoder(x0)
        x_t0 = invert_to_t0(source_unet, x0, z_sem, scheduler, t0, num_inversion_steps)
        parts["z_sem"].append(z_sem.float())
        parts["x_t0"].append(x_t0.float())
    result = {"x0": images.detach().float().cpu()}
    for key, chunks in parts.items():
        result[key] = gather_in_order(torch.cat(chunks), order, n, accelerator)
    return result


# ------------------------------------------------------------------------- logging


class LossLog:
    """Losses to TensorBoard when it is installed, else to ``losses.csv`` (main process only).

    ``resumed_at``: the step a resumed run continues from. Rows (TensorBoard events) logged
    after it by the interrupted run are dropped, so the log holds each step once; a fresh run
    (``0``) starts an empty log.
    """

    HEADER = ["stage", "step", "name", "value"]

    def __init__(self, output_dir=None, enabled: bool = True, resumed_at: int = 0):
        self.writer = self.csv = None
        if output_dir is None or not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "logs"), purge_step=resumed_at + 1)
        except ImportError:  # tensorboard is an optional extra
            path = Path(output_dir) / "losses.csv"
            kept = []
            if resumed_at and path.is_file():
                with open(path, newline="") as handle:
                    kept = [row for row in csv.reader(handle) if row[1:2] and row[1].isdigit() and int(row[1]) <= resumed_at]
            self._file = open(path, "w", newline="")
            self.csv = csv.writer(self._file)
            self.csv.writerows([self.HEADER, *kept])

    def log(self, stage: str, step: int, values: dict):
        for name, value in values.items():
            if self.writer is not None:
                self.writer.add_scalar(f"{stage}/{name}", value, step)
            elif self.csv is not None:
                self.csv.writerow([stage, step, name, f"{value:.6g}"])
        if self.csv is not None:
            self._file.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
        elif self.csv is not None:
            self._file.close()


# -------------------------------------------------------------------------- training


def batch_indices(num_items: int, batch_size: int, iteration: int, seed: int, world: int = 1, rank: int = 0):
    """Cache indices of this process's share of iteration ``iteration``'s global batch.

    A pure function of its arguments (epoch-wise permutations seeded by ``seed`` and the
    epoch number), so a resumed run draws exactly the batches of an uninterrupted one. The
    global batch has ``batch_size * world`` items; process ``rank`` takes every
    ``world``-th.
    """
    global_batch = batch_size * world
    start = iteration * global_batch
    out: list[int] = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), num_items)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset : offset + global_batch - len(out)].tolist())
    return out[rank::world]


@contextlib.contextmanager
def frozen(*modules):
    """Temporarily ``requires_grad_(False)`` (gradients still flow *through* the modules)."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@dataclass
class Stage2Result:
    unet: torch.nn.Module
    step: int
    history: list = field(default_factory=list)


class Stage2Trainer:
    """Fine-tunes a copy of ``source_unet`` with the adaptive directional loss (Eq. 7-9).

    Args:
        source_unet: the source DiffAE UNet ``(x_t, t, z_sem) -> eps``; never modified.
        scheduler: the pipeline's diffusers ``DDIMScheduler`` (``alphas_cumprod``).
        cache: :func:`encode_sources` output for N images.
        source_text_features, target_text_features: ``(N, D)`` per-image prompt features of
            the source / target label (equal rows for the manual / learned schemes, which
            turns Eq. 7-9 into NADA's directional loss).
        image_features: differentiable CLIP image features ``(B,3,H,W) in [-1,1] -> (B, D)``.
        config: :class:`Stage2Config`.
        identity_features: ``(B,3,H,W) -> (B, E)`` for the identity regulariser (cosine
            distance of each adapted image's features to its source image's).
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
        output_dir: where ``checkpoints/``, ``samples/`` and the loss log go (None: nothing).
        run_config: JSON-able dict stored in every checkpoint.
    """

    def __init__(
        self,
        source_unet,
        scheduler,
        cache,
        source_text_features,
        target_text_features,
        image_features: Callable,
        config: Stage2Config,
        identity_features: Callable | None = None,
        accelerator=None,
        output_dir=None,
        run_config: dict | None = None,
    ):
        self.config = config
        self.accelerator = accelerator or make_accelerator(
            config.mixed_precision, next(source_unet.parameters()).device
        )
        self.device = self.accelerator.device
        self.scheduler = scheduler
        self.t0 = check_t0(config.t0, scheduler)
        n = cache["x0"].shape[0]
        if source_text_features.shape[0] != n or target_text_features.shape[0] != n:
            raise ValueError(
                f"need one source and one target text feature per image ({n}); got "
                f"{tuple(source_text_features.shape)} and {tuple(target_text_features.shape)}"
            )
        if config.id_loss_weight > 0 and identity_features is None:
            raise ValueError("id_loss_weight > 0 needs identity_features")
        self.cache = {k: v.to(self.device) for k, v in cache.items()}
        self.image_features = image_features
        self.identity_features = identity_features
        self.src_text = source_text_features.detach().to(self.device, torch.float32)
        self.tgt_text = target_text_features.detach().to(self.device, torch.float32)
        with torch.no_grad():
            chunks = range(0, n, 16)
            # ΔI's source is x0, never the source UNet's own decoding (module docstring).
            self.src_image = torch.cat([image_features(self.cache["x0"][i : i + 16]).float() for i in chunks])
            self.src_identity = None
            if config.id_loss_weight > 0:
                self.src_identity = torch.cat(
                    [identity_features(self.cache["x0"][i : i + 16]).float() for i in chunks]
                )
        self.source_unet = source_unet
        # The trainable copy: the (EMA) weights as given, fp32 master weights, and eval() so
        # that DiffAE's dropout stays off while training (DiffusionCLIP's train() would enable it).
        self.unet = copy.deepcopy(source_unet).to(self.device).eval()
        if any(p.dtype != torch.float32 for p in self.unet.parameters()):
            self.unet.to(dtype=torch.float32)
        self.unet.requires_grad_(True)
        predict = functools.partial(ddim.predict_eps, scheduler=scheduler)
        self._call = predict
        if config.gradient_checkpointing:
            if getattr(self.unet, "_supports_gradient_checkpointing", False):
                self.unet.enable_gradient_checkpointing()
            else:  # checkpoint whole UNet calls: only each step's input stays alive
                self._call = lambda unet, x, t, z: torch.utils.checkpoint.checkpoint(
                    predict, unet, x, t, z, use_reentrant=False
                )
        self._trainable = [p for p in self.unet.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(self._trainable, lr=config.learning_rate, weight_decay=0.0)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.run_config = run_config or {"stage2": asdict(config)}
        self.step = 0
        self.history: list[dict] = []
        self._plan = ddim.decode_plan(ddim.ddim_timesteps(scheduler, config.num_train_steps, self.t0))
        self._alphas = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._final_alpha = float(scheduler.final_alpha_cumprod)

    # -- losses ------------------------------------------------------------------------
    def losses(self, images: torch.Tensor, index: list[int]) -> dict[str, torch.Tensor]:
        """Weighted loss terms for the adapted ``images (B,3,H,W)`` of cache items ``index``.

        ``directional``: Eq. 7-9 (``losses.adaptive_directional_loss``) from the source image
        ``x0`` to the adapted model's decoding of its ``x_{t0}``; ``l1``: mean
        absolute difference to the source image; ``identity``: ``1 - cos`` of identity
        features. Raises ``ValueError`` naming the term when one is NaN / inf.
        """
        from ipl_diffusion.losses import adaptive_directional_loss

        cfg = self.config
        images = images.float()
        terms = {
            "directional": cfg.clip_loss_weight
            * adaptive_directional_loss(
                self.src_image[index], self.image_features(images).float(), self.src_text[index], self.tgt_text[index]
            )
        }
        if cfg.l1_loss_weight > 0:
            terms["l1"] = cfg.l1_loss_weight * (images - self.cache["x0"][index]).abs().mean()
        if cfg.id_loss_weight > 0:
            ident = self.identity_features(images).float()
            terms["identity"] = cfg.id_loss_weight * (1 - F.cosine_similarity(ident, self.src_identity[index], dim=-1)).mean()
        for name, value in terms.items():
            if not torch.isfinite(value):
                raise ValueError(
                    f"Stage 2 loss term {name!r} is {value.item()} at iteration {self.step}; "
                    "lower the learning rate or turn mixed precision off"
                )
        return terms

    def _update(self, loss) -> float:
        """Backward, all-reduce, clip, Adam step; returns the gradient norm before clipping."""
        # inputs=: gradients accumulate only in the trained UNet, never in the frozen CLIP /
        # semantic encoder the loss passes through (whatever their requires_grad).
        self.accelerator.backward(loss, inputs=self._trainable)
        average_gradients(list(self.unet.parameters()), self.accelerator)
        # An infinite bound only measures: clip_grad_norm_ returns the norm either way.
        norm = self.accelerator.clip_grad_norm_(self._trainable, self.config.max_grad_norm or math.inf)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def _step(self, x, model_t, level, next_level, z_sem):
        eps = self._call(self.unet, x, model_t, z_sem).float()
        return ddim.ddim_step(eps, x, level, next_level, self._alphas, self._final_alpha)

    def train_step(self, index: list[int]) -> dict[str, float]:
        """One iteration on cache items ``index``; returns the loss terms as floats.

        ``full_chain``: one optimiser step after decoding all ``num_train_steps``;
        ``per_step``: one optimiser step per DDIM step, on that step's ``x̂0`` (logged
        values are the mean over the steps).
        """
        x = self.cache["x_t0"][index]
        z_sem = self.cache["z_sem"][index]
        logged: dict[str, float] = {}
        if self.config.gradient_mode == "full_chain":
            with self.accelerator.autocast():
                for model_t, level, next_level in self._plan:
                    x, _ = self._step(x, model_t, level, next_level, z_sem)
                terms = self.losses(x, index)
                loss = sum(terms.values())
            grad_norm = self._update(loss)
            logged = {k: v.item() for k, v in terms.items()}
        else:
            grad_norm = 0.0
            for model_t, level, next_level in self._plan:
                with self.accelerator.autocast():
                    x_next, x0_hat = self._step(x.detach(), model_t, level, next_level, z_sem)
                    terms = self.losses(x0_hat, index)
                    loss = sum(terms.values())
                grad_norm = max(grad_norm, self._update(loss))
                x = x_next.detach()
                for k, v in terms.items():
                    logged[k] = logged.get(k, 0.0) + v.item() / len(self._plan)
        logged["loss"] = sum(logged.values())
        logged["grad_norm"] = grad_norm  # before clipping; per_step: the largest of the steps
        return logged

    # -- samples -----------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, unet=None, num_images: int | None = None, items: dict | None = None):
        """Labelled PIL grid, one column per image; rows: source | DDIM round trip | adapted.

        ``items``: ``{"x0", "z_sem", "x_t0"}`` of the images to show (e.g. held-out photos
        encoded by :func:`encode_sources`); default: the first training images. The round
        trip and the adaptation decode ``x_{t0}`` in ``num_inference_steps`` steps with the
        source and the adapted UNet.
        """
        from ipl_diffusion.grids import labelled_grid

        unet = unet or self.unet
        items = items if items is not None else self.cache
        k = min(num_images or self.config.num_sample_images, items["x0"].shape[0])
        x_t0, z_sem = items["x_t0"][:k].to(self.device), items["z_sem"][:k].to(self.device)
        steps = self.config.num_inference_steps
        recon = decode_from_t0(self.source_unet, x_t0, z_sem, self.scheduler, self.t0, steps)
        adapted = decode_from_t0(unet, x_t0, z_sem, self.scheduler, self.t0, steps)
        shown = "source" if items is self.cache else "held-out source"
        labels = [shown, "DDIM round trip", f"adapted ({self.run_config.get('target', 'target')})"]
        return labelled_grid([items["x0"][:k], recon, adapted], labels, [str(i) for i in range(k)])

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoint_dir(self):
        return self.output_dir / "checkpoints" if self.output_dir is not None else None

    def resume(self, name) -> int:
        """Restore ``name`` (``"latest"`` or a checkpoint folder); returns the step resumed at.

        ``"latest"`` with no checkpoint yet starts from step 0.
        """
        if name is None or (self.output_dir is None and str(name) == "latest"):
            return self.step
        path = checkpointing.resolve_checkpoint(self.checkpoint_dir() or Path("."), name)
        if path is None:
            return self.step
        self.step, saved = checkpointing.load_checkpoint(path, {"unet": self.unet}, {"optimizer": self.optimizer.optimizer})
        checkpointing.check_same_run(path, saved, self.run_config)
        if self.accelerator.scaler is not None and saved.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(saved["grad_scaler"])
        history = path / "history.json"
        self.history = json.loads(history.read_text()) if history.is_file() else []
        return self.step

    def save(self):
        """Checkpoint (main process only); returns the folder or None."""
        if self.output_dir is None or not self.accelerator.is_main_process:
            return None
        state = dict(self.run_config)
        if self.accelerator.scaler is not None:  # fp16: the loss scale is part of the training state
            state["grad_scaler"] = self.accelerator.scaler.state_dict()
        path = checkpointing.save_checkpoint(
            self.checkpoint_dir(),
            self.step,
            {"unet": self.accelerator.unwrap_model(self.unet)},
            {"optimizer": self.optimizer.optimizer},
            config=state,
            keep=self.config.checkpoints_total_limit,
        )
        # The loss curve rides along as JSON, written after the atomic move: losing it loses
        # only the curve, never the weights.
        (path / "history.json").write_text(json.dumps(self.history))
        return path

    # -- loop --------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, progress: bool = True) -> Stage2Result:
        """Run to ``config.iterations``; returns the adapted UNet in ``eval()`` mode."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        if resume_from_checkpoint is None and self.output_dir is not None:
            checkpointing.refuse_foreign_checkpoints(self.checkpoint_dir())
        self.resume(resume_from_checkpoint)
        log = LossLog(self.output_dir, enabled=acc.is_main_process, resumed_at=self.step)
        n = self.cache["x0"].shape[0]
        bar = tqdm(
            total=cfg.iterations,
            initial=self.step,
            desc="Stage 2: fine-tuning the UNet",
            disable=not (progress and acc.is_local_main_process),
        )
        try:
            while self.step < cfg.iterations:
                index = batch_indices(n, cfg.batch_size, self.step, cfg.seed, acc.num_processes, acc.process_index)
                started = time.perf_counter()
                values = self.train_step(index)
                values = mean_over_processes(values, acc)  # the global batch's loss, not this shard's
                self.step += 1
                values["seconds"] = time.perf_counter() - started
                self.history.append({"step": self.step, **values})
                log.log("stage2", self.step, values)
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                if cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0:
                    self.save()
                if cfg.sample_steps and self.output_dir is not None and acc.is_main_process:
                    if self.step % cfg.sample_steps == 0 or self.step == cfg.iterations:
                        folder = self.output_dir / "samples"
                        folder.mkdir(parents=True, exist_ok=True)
                        self.sample_grid().save(folder / f"step_{self.step:06d}.png")
        finally:
            bar.close()
            log.close()
        acc.wait_for_everyone()
        return Stage2Result(unet=acc.unwrap_model(self.unet).eval(), step=self.step, history=self.history)


# ------------------------------------------------------------------ Stage 1 + Stage 2


@dataclass
class Stage1Options:
    """Stage 1 (prompt learning, Eq. 6) options; defaults from the paper / IPL code. Its seed
    is the run's (``Stage2Config.seed``): one seed governs both stages."""

    scheme: str = "adaptive"
    lambda_domain: float = 1.0
    iterations: int = 300
    batch_size: int = 32
    learning_rate: float | None = None  # None: prompt_learning's default (0.05 mapper, 2e-3 shared)
    n_ctx: int = 4


# Held-out share of Stage 1's pool for the retrieval diagnostic: a fifth, at most 256 images,
# and none when that would be fewer than 8 (retrieval among so few says little).
MAX_HELDOUT, MIN_HELDOUT = 256, 8


def heldout_size(pool_size: int) -> int:
    """How many of ``pool_size`` Stage-1 images are held out for :func:`prompt_retrieval`."""
    k = min(MAX_HELDOUT, pool_size // 5)
    return k if k >= MIN_HELDOUT else 0


@dataclass
class DiffIPLResult:
    """What :func:`adapt_diffae` returns."""

    unet: torch.nn.Module
    mapper: torch.nn.Module | None
    sample_grid: object | None
    history: list
    run_config: dict
    source_text_features: torch.Tensor
    target_text_features: torch.Tensor


def clip_image_features(clip_model, feature_extractor=None) -> Callable:
    """Differentiable CLIP image features ``(B,3,H,W) in [-1,1] -> (B, D)`` (raw, projected).

    ``feature_extractor`` (a ``CLIPImageProcessor``) supplies the normalisation; without one,
    ``CLIPImageProcessor()``'s defaults are OpenAI CLIP's mean / std.
    """
    from transformers import CLIPImageProcessorPil

    from ipl_diffusion.clip_image import CLIPImageEncoder

    return CLIPImageEncoder(clip_model, feature_extractor or CLIPImageProcessorPil()).encode_images


def run_stage1(clip_model, tokenizer, z_sem, image_features, source, target, options: Stage1Options, seed: int, progress=True):
    """IPL Stage 1 on a pool of cached features; returns the ``PromptLearner``.

    ``z_sem (N, 512)`` is the mapper input (Eq. 2) and ``image_features (N, D)`` the CLIP
    features of the same source images. The last :func:`heldout_size` of them are held out
    and measured with :func:`~ipl_diffusion.prompt_learning.prompt_retrieval`
    (``learner.heldout_retrieval``; ``None`` for a pool too small to hold any out).
    """
    from ipl_diffusion.clip_text import CLIPPromptEncoder
    from ipl_diffusion.prompt_learning import learn_prompts

    k = heldout_size(z_sem.shape[0])
    train = slice(0, z_sem.shape[0] - k)
    return learn_prompts(
        CLIPPromptEncoder(clip_model, tokenizer),
        z_sem[train],
        source,
        target,
        image_features=image_features[train],
        heldout=(z_sem[-k:], image_features[-k:]) if k else None,
        scheme=options.scheme,
        n_ctx=options.n_ctx,
        num_iterations=options.iterations,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        lambda_domain=options.lambda_domain,
        seed=seed,
        progress=progress,
    )


@torch.no_grad()
def prompt_text_features(learner, z_sem, source, target, batch_size=64):
    """``(source (N, D), target (N, D))`` per-image prompt features of a ``PromptLearner``."""
    src = torch.cat([learner.text_features(z_sem[i : i + batch_size], source) for i in range(0, len(z_sem), batch_size)])
    tgt = torch.cat([learner.text_features(z_sem[i : i + batch_size], target) for i in range(0, len(z_sem), batch_size)])
    return src.float(), tgt.float()


def load_prompt_module(folder):
    """Load a saved ``LatentMapper`` / ``SharedPromptContext`` by the class named in its config."""
    from ipl_diffusion import mapper as mapper_module

    name = json.loads((Path(folder) / "config.json").read_text()).get("_class_name")
    if name not in ("LatentMapper", "SharedPromptContext"):
        raise ValueError(f"{folder}: not a prompt module (class {name!r})")
    return getattr(mapper_module, name).from_pretrained(str(folder))


def validate_labels(clip_model, tokenizer, source, target, n_ctx=4):
    """``(source, target)`` cleaned, or ``ValueError`` for empty / too long labels -- checked
    before any encoding work."""
    from ipl_diffusion.clip_text import CLIPPromptEncoder

    encoder = CLIPPromptEncoder(clip_model, tokenizer)
    return encoder.validate_label(source, n_ctx=n_ctx), encoder.validate_label(target, n_ctx=n_ctx)


def _same_cache(cache_file: Path, images: torch.Tensor, key: dict) -> dict | None:
    """The saved cache when it was made from the same images with the same options."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not cache_file.is_file():
        return None
    with safe_open(str(cache_file), "pt") as handle:
        metadata = handle.metadata() or {}
        if json.loads(metadata.get("key", "null")) != key:
            return None
    cache = load_file(str(cache_file))
    checkpointing.verify_tensors(cache_file, cache, metadata)  # resume from damaged codes: refused
    if cache["x0"].shape != images.shape or not torch.equal(cache["x0"], images.detach().float().cpu()):
        return None
    return cache


@torch.no_grad()
def encode_pool(semantic_encoder, image_features, images: torch.Tensor, device, batch_size: int = 64):
    """Stage 1's pool: ``(z_sem (N, 512), CLIP image features (N, D))`` of source ``images``
    ``(N, 3, H, W)`` in ``[-1, 1]`` -- no DDIM needed: Stage 1 sees only these two."""
    z, f = [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device, torch.float32)
        z.append(semantic_encoder(x).float())
        f.append(image_features(x).float())
    return torch.cat(z), torch.cat(f)


def _prepare_cache(semantic_encoder, source_unet, scheduler, images, stage1_images, image_features, source, target,
                   stage1, stage2, accelerator, progress, clip_model, tokenizer):
    """Encode the Stage-2 images, run Stage 1 on its pool; returns ``(cache, learner)``."""
    device = accelerator.device
    cache = encode_sources(
        semantic_encoder, source_unet, scheduler, images, stage2.t0, stage2.num_inversion_steps,
        accelerator=accelerator, progress=progress,
    )
    pool = encode_pool(semantic_encoder, image_features, stage1_images, device)
    # Every process runs the (cheap, cached-feature) Stage 1 with the same seed, so all end
    # with the same prompts without a broadcast.
    learner = run_stage1(
        clip_model, tokenizer, *pool, source, target, stage1, seed=stage2.seed,
        progress=progress and accelerator.is_local_main_process,
    )
    src_text, tgt_text = prompt_text_features(learner, cache["z_sem"].to(device), source, target)
    cache["source_text_features"], cache["target_text_features"] = src_text.cpu(), tgt_text.cpu()
    return cache, learner


def stage1_report(learner, pool_size: int) -> dict:
    """What ``run_config.json`` records of Stage 1's result (held-out retrieval, chance level)."""
    k = heldout_size(pool_size)
    return {
        "pool_images": pool_size - k,
        "heldout_images": k,
        "heldout_retrieval": learner.heldout_retrieval if learner is not None else None,
        "retrieval_chance": 1 / min(32, k) if k else None,
    }


def adapt_diffae(
    *,
    semantic_encoder,
    source_unet,
    scheduler,
    clip_model,
    tokenizer,
    images: torch.Tensor,
    source: str,
    target: str,
    stage1: Stage1Options | None = None,
    stage2: Stage2Config | None = None,
    stage1_images: torch.Tensor | None = None,
    validation_images: torch.Tensor | None = None,
    feature_extractor=None,
    accelerator=None,
    output_dir=None,
    resume_from_checkpoint=None,
    progress: bool = True,
    base_model: str | None = None,
) -> DiffIPLResult:
    """Diff-IPL end to end on source ``images (N,3,H,W) in [-1,1]``: encode + cache, Stage 1,
    Stage 2. Shared by ``IPLPipeline.adapt``, ``ipl adapt`` and ``examples/train_ipl_diffae.py``.

    ``stage1_images`` ``(M,3,H,W)`` in ``[-1,1]``: Stage 1's pool (default: ``images``); a
    mapper generalises only from a large pool (thousands), and a fifth of it (at most 256) is
    held out to measure that (``run_config["stage1"]["heldout_retrieval"]``).
    ``validation_images``: what the returned ``sample_grid`` shows (default: the first 8
    ``images``), e.g. photos the run never trained on.

    With ``output_dir`` the run writes ``run_config.json``, ``cache.safetensors`` (the
    encoded sources and the Stage-1 text features, reused on resume), ``stage1/`` (the
    prompt module and Stage 1's loss / held-out retrieval history, as GAN-IPL writes it),
    checkpoints, sample grids and the loss log there (main process only), and
    ``resume_from_checkpoint="latest"`` continues an interrupted run bit for bit.
    """
    stage1 = stage1 or Stage1Options()
    stage2 = stage2 or Stage2Config()
    accelerator = accelerator or make_accelerator(stage2.mixed_precision, next(source_unet.parameters()).device)
    check_weights_dtype({"semantic_encoder": semantic_encoder, "source_unet": source_unet, "text_encoder": clip_model}, accelerator.device)
    for name, x in (("source images", images), ("stage1_images", stage1_images), ("validation_images", validation_images)):
        if x is not None and (x.ndim != 4 or x.shape[1] != 3 or x.shape[0] < 1):
            raise ValueError(f"{name} must be (N, 3, H, W) in [-1, 1] with N >= 1; got {tuple(x.shape)}")
    stage1_images = images if stage1_images is None else stage1_images
    t0 = check_t0(stage2.t0, scheduler)
    source, target = validate_labels(clip_model, tokenizer, source, target, stage1.n_ctx)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:  # before the cache / Stage 1 are written
        checkpointing.check_before_run(out / "checkpoints", resume_from_checkpoint)
    run_config = {
        "source": source,
        "target": target,
        "base_model": base_model,
        "seed": stage2.seed,
        "num_source_images": int(images.shape[0]),
        "image_size": int(images.shape[-1]),
        "num_processes": accelerator.num_processes,
        "stage1": asdict(stage1),
        "stage2": asdict(stage2),
    }
    for module in (semantic_encoder, source_unet, clip_model):
        module.to(accelerator.device).eval()
    image_features = clip_image_features(clip_model, feature_extractor)
    key = {"t0": t0, "num_inversion_steps": stage2.num_inversion_steps, "stage1": asdict(stage1),
           "source": source, "target": target, "seed": stage2.seed, "stage1_images": checkpointing.tensors_sha256({"x": stage1_images.float()})}
    cache_file = out / "cache.safetensors" if out is not None else None
    with frozen(semantic_encoder, source_unet, clip_model):
        cache = _same_cache(cache_file, images, key) if (cache_file is not None and resume_from_checkpoint) else None
        learner = None
        if cache is None:
            cache, learner = _prepare_cache(
                semantic_encoder, source_unet, scheduler, images, stage1_images, image_features, source, target,
                stage1, stage2, accelerator, progress, clip_model, tokenizer,
            )
            run_config["stage1"].update(stage1_report(learner, stage1_images.shape[0]))
            if out is not None and accelerator.is_main_process:
                _write_stage1(out, run_config, cache, cache_file, key, learner)
        else:
            run_config["stage1"].update(_saved_stage1_report(out))
        mapper = _saved_mapper(out, learner, accelerator.device)
        trainer = Stage2Trainer(
            source_unet, scheduler, {k: cache[k] for k in ("x0", "z_sem", "x_t0")}, cache["source_text_features"],
            cache["target_text_features"], image_features, stage2,
            identity_features=semantic_encoder if stage2.id_loss_weight > 0 else None,
            accelerator=accelerator, output_dir=out, run_config=run_config,
        )
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint, progress=progress)
        grid = None
        if accelerator.is_main_process:
            shown = None
            if validation_images is not None:
                shown = encode_sources(semantic_encoder, source_unet, scheduler, validation_images, t0,
                                       stage2.num_inversion_steps, progress=False)
            grid = trainer.sample_grid(result.unet, items=shown)
    return DiffIPLResult(
        unet=result.unet,
        mapper=mapper,
        sample_grid=grid,
        history=result.history,
        run_config=run_config,
        source_text_features=cache["source_text_features"],
        target_text_features=cache["target_text_features"],
    )


def _write_stage1(out: Path, run_config: dict, cache: dict, cache_file: Path, key: dict, learner) -> None:
    """``run_config.json``, ``cache.safetensors`` and ``stage1/`` (main process)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(json.dumps(run_config, indent=2))
    digest = checkpointing.tensors_sha256(cache)  # checked when a resume reuses the cache
    save_file({k: v.contiguous() for k, v in cache.items()}, str(cache_file),
              metadata={"key": json.dumps(key), "sha256": digest})
    learner.save_pretrained(out / "stage1")


def _saved_stage1_report(out: Path) -> dict:
    """A resumed run's Stage-1 report, from the ``run_config.json`` its first part wrote."""
    path = out / "run_config.json"
    saved = json.loads(path.read_text()).get("stage1", {}) if path.is_file() else {}
    return {k: saved.get(k) for k in ("pool_images", "heldout_images", "heldout_retrieval", "retrieval_chance")}


def _saved_mapper(out, learner, device):
    """The Stage-1 prompt module: this run's, or on resume the one saved in ``out/stage1``."""
    if learner is not None:
        return learner.prompt_module
    if out is not None and (out / "stage1" / "prompt_module").is_dir():
        return load_prompt_module(out / "stage1" / "prompt_module").to(device)
    return None
