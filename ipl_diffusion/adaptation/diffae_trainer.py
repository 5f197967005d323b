"""Diff-IPL's Stage 2: fine-tune a copy of the source DiffAE UNet with Eq. 7-9 (DiffusionCLIP's recipe).

Every cached source image ``x_i`` (its ``z_sem`` and its DDIM inversion ``x_{t0}``, see
:func:`ipl_diffusion.adaptation.diffae.encode_sources`) has its own text direction
``ΔT_i = E_T([V_i] target) - E_T([V_i] source)`` from Stage 1's prompt vectors. A copy of the
source UNet (EMA weights, ``eval()`` so DiffAE's dropout stays off -- DiffusionCLIP's
``train()`` would switch it on here) is trained so that the CLIP image direction ``ΔI_i``
from ``x0`` to its decoding of ``x_{t0}`` (``num_train_steps`` DDIM steps) follows ``ΔT_i``;
optional L1 and identity regularisers tie each adapted image to its source.

Why ``ΔI_i`` (Eq. 7) is measured from the source image ``x0`` and not from the source UNet's
decoding ``x_rec``: before the first update the trainable UNet *is* the source UNet, so its
decoding equals ``x_rec`` exactly and ``ΔI_i = 0`` for every image. The loss normalises
``ΔI_i``, so its gradient grows like ``1 / |ΔI_i|``: the first gradient was ~10^6 times the
later ones, and Adam's second moment kept that spike for the whole run. DiffusionCLIP
measures ``ΔI`` from ``x0`` (its ``clip_loss_func(x0, src_txt, x, trg_txt)``), so the first
step sees the small but non-zero reconstruction error. The gradient norm is also clipped
(``max_grad_norm``, 1 as in diffusers' training scripts).

Two gradient modes:

* ``"full_chain"`` (DiffusionCLIP's original fine-tuning): the loss is taken on the final
  decoded image and back-propagated through all ``num_train_steps`` UNet calls (memory grows
  with the number of steps; ``gradient_checkpointing`` trades it for recomputation);
* ``"per_step"`` (DiffusionCLIP's GPU-efficient mode): after every DDIM step the loss is
  taken on that step's ``x̂0`` prediction and the optimiser steps at once; the chain
  continues from the detached state, so one UNet graph is alive at a time. (Unlike the
  upstream code the identity term is computed on the differentiable ``x̂0``, so it does
  contribute a gradient.)

The training chain's DDIM steps are :func:`ipl_diffusion.ddim.ddim_step` over DiffusionCLIP's
grid ``linspace(0, t0, n)`` without x0 clipping (clipping would zero the gradient of every
saturated pixel); ``alphas_cumprod`` comes from the pipeline's diffusers ``DDIMScheduler``.

Multi-process (``accelerate launch``): every process takes its own slice of each global
batch, gradients are averaged with one all-reduce per update, and only the main process
writes. The UNet is *not* wrapped in DDP because the full chain calls it several times before
one backward pass, which DDP's reducer does not support.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

from ipl_diffusion import ddim
from ipl_diffusion.adaptation.distributed import average_gradients, make_accelerator, mean_over_processes
from ipl_diffusion.adaptation.trainer import Trainer
from ipl_diffusion.errors import check_finite
from ipl_diffusion.configs import DiffAEStage2Config, as_dict
from ipl_diffusion.errors import UserError


def batch_indices(num_items: int, batch_size: int, iteration: int, seed: int, world: int = 1, rank: int = 0):
    """Cache indices of this process's share of iteration ``iteration``'s global batch.

    A pure function of its arguments (epoch-wise permutations seeded by ``seed`` and the
    epoch number), so a resumed run draws exactly the batches of an uninterrupted one. The
    global batch has ``batch_size * world`` items; process ``rank`` takes every ``world``-th.
    """
    global_batch = batch_size * world
    start = iteration * global_batch
    out: list[int] = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), num_items)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.extend(perm[offset : offset + global_batch - len(out)].tolist())
    return out[rank::world]


class DiffAEStage2Trainer(Trainer):
    """Fine-tunes a copy of ``source_unet`` with the adaptive directional loss (Eq. 7-9).

    Args:
        source_unet: the source DiffAE UNet ``(x_t, t, z_sem) -> eps``; never modified.
        scheduler: the pipeline's diffusers ``DDIMScheduler`` (``alphas_cumprod``).
        cache: :func:`~ipl_diffusion.adaptation.diffae.encode_sources` output for N images.
        source_text_features, target_text_features: ``(N, D)`` per-image prompt features of
            the source / target label (equal rows for the manual / learned schemes, which
            turns Eq. 7-9 into NADA's directional loss).
        image_features: differentiable CLIP image features ``(B,3,H,W) in [-1,1] -> (B, D)``.
        config: :class:`~ipl_diffusion.configs.DiffAEStage2Config`.
        identity_features: ``(B,3,H,W) -> (B, E)`` for the identity regulariser.
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator`).
        output_dir: where ``checkpoints/``, ``samples/`` and ``losses.csv`` go (None: nothing).
        run_config: JSON-able dict stored in every checkpoint.

    Raises:
        UserError: text features not one per image, or ``id_loss_weight > 0`` without
            ``identity_features``.
    """

    description = "Stage 2: fine-tuning the UNet"

    def __init__(self, source_unet, scheduler, cache, source_text_features, target_text_features,
                 image_features: Callable, config: DiffAEStage2Config, identity_features: Callable | None = None,
                 accelerator=None, output_dir=None, run_config: dict | None = None):
        accelerator = accelerator or make_accelerator(config.mixed_precision, next(source_unet.parameters()).device)
        self.setup(config, accelerator, output_dir, run_config or {"stage2": as_dict(config)})
        self.scheduler = scheduler
        self.t0 = ddim.check_t0(config.t0, scheduler)
        n = cache["x0"].shape[0]
        if source_text_features.shape[0] != n or target_text_features.shape[0] != n:
            raise UserError(
                f"need one source and one target text feature per image ({n}); got "
                f"{tuple(source_text_features.shape)} and {tuple(target_text_features.shape)}"
            )
        if config.id_loss_weight > 0 and identity_features is None:
            raise UserError("id_loss_weight > 0 needs identity_features")
        self.cache = {k: v.to(self.device) for k, v in cache.items()}
        self.image_features, self.identity_features = image_features, identity_features
        self.src_text = source_text_features.detach().to(self.device, torch.float32)
        self.tgt_text = target_text_features.detach().to(self.device, torch.float32)
        self._cache_source_features()
        self.source_unet = source_unet
        self.unet = self._trainable_copy(source_unet)
        self._trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = self.accelerator.prepare(torch.optim.Adam(self._trainable, lr=config.learning_rate, weight_decay=0.0))
        self._plan = ddim.decode_plan(ddim.ddim_timesteps(scheduler, config.num_train_steps, self.t0))
        self._alphas = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._final_alpha = float(scheduler.final_alpha_cumprod)

    @torch.no_grad()
    def _cache_source_features(self):
        # ΔI's source is x0, never the source UNet's own decoding (module docstring).
        chunks = range(0, self.cache["x0"].shape[0], 16)
        self.src_image = torch.cat([self.image_features(self.cache["x0"][i : i + 16]).float() for i in chunks])
        self.src_identity = None
        if self.config.id_loss_weight > 0:
            self.src_identity = torch.cat([self.identity_features(self.cache["x0"][i : i + 16]).float() for i in chunks])

    def _trainable_copy(self, source_unet):
        """The trainable copy: the (EMA) weights as given, fp32 master weights, ``eval()`` so
        that DiffAE's dropout stays off while training."""
        unet = copy.deepcopy(source_unet).to(self.device).eval()
        if any(p.dtype != torch.float32 for p in unet.parameters()):
            unet.to(dtype=torch.float32)
        unet.requires_grad_(True)
        predict = functools.partial(ddim.predict_eps, scheduler=self.scheduler)
        self._call = predict
        if self.config.gradient_checkpointing:
            if getattr(unet, "_supports_gradient_checkpointing", False):
                unet.enable_gradient_checkpointing()
            else:  # checkpoint whole UNet calls: only each step's input stays alive
                self._call = lambda unet, x, t, z: torch.utils.checkpoint.checkpoint(predict, unet, x, t, z, use_reentrant=False)
        return unet

    # -- losses ------------------------------------------------------------------------
    def losses(self, images: torch.Tensor, index: list[int]) -> dict[str, torch.Tensor]:
        """Weighted loss terms for the adapted ``images (B,3,H,W)`` of cache items ``index``.

        ``directional``: Eq. 7-9 from the source image ``x0`` to the adapted decoding;
        ``l1``: mean absolute difference to the source image; ``identity``: ``1 - cos`` of
        identity features.

        Raises:
            NonFiniteLossError: a term is NaN / inf (names the term and the iteration).
        """
        from ipl_diffusion.losses import adaptive_directional_loss

        cfg = self.config
        images = images.float()
        feats = self.image_features(images).float()
        terms = {"directional": cfg.clip_loss_weight * adaptive_directional_loss(
            self.src_image[index], feats, self.src_text[index], self.tgt_text[index])}
        if cfg.l1_loss_weight > 0:
            terms["l1"] = cfg.l1_loss_weight * (images - self.cache["x0"][index]).abs().mean()
        if cfg.id_loss_weight > 0:
            ident = self.identity_features(images).float()
            terms["identity"] = cfg.id_loss_weight * (1 - F.cosine_similarity(ident, self.src_identity[index], dim=-1)).mean()
        check_finite(terms, "Stage 2", self.step)
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

    def step_on(self, index: list[int]) -> dict[str, float]:
        """One iteration on cache items ``index``; returns this process's loss terms as floats.

        ``full_chain``: one optimiser step after decoding all ``num_train_steps``;
        ``per_step``: one optimiser step per DDIM step, on that step's ``x̂0`` (logged
        values are the mean over the steps; ``grad_norm`` the largest).
        """
        x, z_sem = self.cache["x_t0"][index], self.cache["z_sem"][index]
        logged: dict[str, float] = {}
        if self.config.gradient_mode == "full_chain":
            with self.accelerator.autocast():
                for model_t, level, next_level in self._plan:
                    x, _ = self._step(x, model_t, level, next_level, z_sem)
                terms = self.losses(x, index)
            grad_norm = self._update(sum(terms.values()))
            logged = {k: v.item() for k, v in terms.items()}
        else:
            grad_norm = 0.0
            for model_t, level, next_level in self._plan:
                with self.accelerator.autocast():
                    x_next, x0_hat = self._step(x.detach(), model_t, level, next_level, z_sem)
                    terms = self.losses(x0_hat, index)
                grad_norm = max(grad_norm, self._update(sum(terms.values())))
                x = x_next.detach()
                for k, v in terms.items():
                    logged[k] = logged.get(k, 0.0) + v.item() / len(self._plan)
        logged["loss"] = sum(logged.values())
        logged["grad_norm"] = grad_norm  # before clipping
        return logged

    def iteration(self, index: list[int] | None = None) -> dict[str, float]:
        """One iteration on cache items ``index`` (default: this iteration's share of the
        global batch, :func:`batch_indices`), its values averaged over processes."""
        cfg, acc = self.config, self.accelerator
        if index is None:
            index = batch_indices(self.cache["x0"].shape[0], cfg.batch_size, self.step, cfg.seed, acc.num_processes, acc.process_index)
        started = time.perf_counter()
        values = mean_over_processes(self.step_on(index), acc)  # the global batch's loss, not this shard's
        values["seconds"] = time.perf_counter() - started
        return values

    # -- what the shared loop needs ------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {"models": {"unet": self.accelerator.unwrap_model(self.unet)}, "optimizers": {"optimizer": self.optimizer.optimizer}}

    def trained_model(self):
        return self.accelerator.unwrap_model(self.unet).eval()

    def enable_step_choice(self, image_features, source_text, target_text, heldout: dict | None = None) -> None:
        """:meth:`Trainer.enable_step_choice` with the held-out photos the candidates are scored on.

        Args:
            heldout: :func:`~ipl_diffusion.adaptation.diffae.encode_sources` of K >= 2 photos
                the run does not train on (``x0``, ``z_sem``, ``x_t0``).

        Raises:
            UserError: no held-out photos, or fewer than 2.
        """
        if heldout is None or heldout["x0"].shape[0] < 2:
            raise UserError("the step choice (candidate_steps) needs >= 2 held-out photos the run does not train on: "
                            "pass validation_images (ipl adapt --validation_images FOLDER)")
        self.heldout = {k: v.to(self.device) for k, v in heldout.items()}
        super().enable_step_choice(image_features, source_text, target_text)

    @torch.no_grad()
    def candidate_images(self, chunk: int = 8):
        """The held-out photos ``x0`` and the current UNet's decoding of their ``x_{t0}``
        (``num_inference_steps`` DDIM steps, as ``IPLPipeline`` translates), ``(K,3,H,W)`` float32."""
        h, steps = self.heldout, self.config.num_inference_steps
        adapted = [ddim.decode_from_t0(self.unet, h["x_t0"][i : i + chunk], h["z_sem"][i : i + chunk], self.scheduler,
                                       self.t0, steps).float() for i in range(0, h["x0"].shape[0], chunk)]
        return h["x0"].float(), torch.cat(adapted)

    @torch.no_grad()
    def sample_grid(self, unet=None, items: dict | None = None):
        """Labelled PIL grid, one column per image; rows (:mod:`ipl_diffusion.before_after`):
        source | DDIM round trip | adapted.

        ``items``: ``{"x0", "z_sem", "x_t0"}`` of the images to show (e.g. held-out photos
        encoded by ``encode_sources``); default: the first training images. Both rows decode
        ``x_{t0}`` in ``num_inference_steps`` steps, with the source and the adapted UNet.
        """
        from ipl_diffusion.before_after import row_labels
        from ipl_diffusion.grids import labelled_grid

        unet = unet or self.unet
        items = items if items is not None else self.cache
        k = min(self.config.num_sample_images, items["x0"].shape[0])
        x_t0, z_sem = items["x_t0"][:k].to(self.device), items["z_sem"][:k].to(self.device)
        steps = self.config.num_inference_steps
        recon = ddim.decode_from_t0(self.source_unet, x_t0, z_sem, self.scheduler, self.t0, steps)
        adapted = ddim.decode_from_t0(unet, x_t0, z_sem, self.scheduler, self.t0, steps)
        labels = row_labels("diffae", self.run_config.get("target", "target"), held_out=items is not self.cache)
        return labelled_grid([items["x0"][:k], recon, adapted], labels, [str(i) for i in range(k)])
