"""GAN-IPL: IPL's Stage 2 (Eq. 7-9) on StyleGAN2, with StyleGAN-NADA's layer freezing.

Set-up (IPL ``train.py`` / NADA ``ZSSGAN.py``, facts §1.5-1.7): a frozen *source* generator
``G_s`` and a trainable *target* generator ``G_t`` start from the same weights. Each
iteration samples ``z``, maps it with the frozen mapping network to ``w`` (no truncation),
asks the latent mapper for that ``w``'s source / target prompt features (Stage 1's product,
passed in as ``prompt_features``), renders ``G_s(w)`` and ``G_t(w)`` and minimises the
adaptive directional CLIP loss (Eq. 7-9)
``mean_i 1 - cos(E_I(G_t(w_i)) - E_I(G_s(w_i)), T_t,i - T_s,i)``.
An EMA copy of ``G_t`` (``g_ema``, decay 0.99, as IPL; NADA saved the raw weights) is what
gets sampled and saved.

Which layers train (NADA):

* ``auto_layer_iters == 0``: a fixed set by ``phase`` -- by default (``phase=None``) the
  constant input, ``conv1`` and every ``convs.*`` (everything but the mapping network and the
  ToRGB layers); ``"all"`` trains everything; ``"texture"``, ``"shape"``, ``"no_fine"``,
  ``"shape_expanded"`` as NADA.
* ``auto_layer_iters > 0`` (the default, as IPL/NADA): **adaptive layer selection** every
  iteration. ``auto_layer_batch`` fresh ``w`` are lifted to W+, ``auto_layer_iters`` SGD steps
  (lr 0.01) move the W+ codes to lower NADA's *global* CLIP loss ``1 - cos(E_I(G_t(w+)),
  E_T(target label))``, and the ``auto_layer_k`` W+ rows that moved most (mean |Δ|) pick the
  layers to train this iteration; all others are frozen.

The off-by-one fix. NADA (and IPL, which copied it) maps a selected W+ row ``j`` to a
module with ``[conv1, to_rgb1, *convs][j]``. But in the synthesis network row 0 drives
``conv1``, row 1 drives ``to_rgb1`` *and* ``convs[0]``, and row ``j >= 2`` drives
``convs[j-1]`` (``G.latent_index_modules``). So upstream, selecting row ``j >= 2`` unfreezes
``convs[j-2]`` -- the layer one step *coarser* than the one the W+ probe found -- selecting
row 1 unfreezes only ``to_rgb1`` (a ToRGB layer NADA otherwise never trains), and
``convs[-1]`` can never be chosen. Here row ``j`` unfreezes the StyledConv that consumes it
(``0 -> conv1``, ``j -> convs[j-1]``). ToRGB layers stay frozen as in NADA's fixed sets,
so the last row (which only feeds the last ToRGB) is not a candidate unless
``train_to_rgb=True``, in which case the ToRGB layers consuming a chosen row train as well.
``compat_layer_mapping=True`` reproduces the upstream mapping for comparisons.

The selection's gradient is taken with ``torch.autograd.grad`` with respect to the W+ codes
only, so unlike upstream it leaves no gradients behind in the generator or in CLIP.

Optimiser (upstream): Adam, ``lr = 0.002 * 4/5 = 0.0016``, ``betas = (0, 0.99 ** (4/5))``
(rosinality's lazy-regularisation scaling with ``g_reg_every = 4``). Frozen layers get no
gradient (``zero_grad(set_to_none=True)``), so Adam leaves them untouched.

Checkpoints: ``output_dir/checkpoints/checkpoint-<step>`` via :mod:`ipl_diffusion.checkpointing`
(safetensors + JSON, atomic) with ``G_t``, ``g_ema``, the optimiser and every RNG state, so a
resumed run continues exactly where it stopped; Stage 1's result is kept in ``output_dir/stage1``
and reused on resume. Accelerate's ``save_state`` is not used because it pickles the optimizer
and RNG states; the device comes from an argument (default: the source generator's), and
mixed precision is plain ``torch.autocast`` (bf16 anywhere, fp16 on CUDA with a grad scaler).
Sample grids (source row | adapted row, fixed ``z``, truncation 0.7, fixed noise) go to
``output_dir/samples/``.

:func:`adapt_stylegan2` runs both stages: Stage 1 (Eq. 6, :mod:`ipl_diffusion.prompt_learning`)
on a cache of source samples -- ``w`` from the mapping network as the mapper input (Eq. 2) and
the CLIP features of ``G_s(w)`` computed once -- then Stage 2 with this module's trainer.
"""

from __future__ import annotations

import copy
import contextlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ipl_diffusion import checkpointing
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator

PHASES = (None, "texture", "shape", "no_fine", "shape_expanded", "all")

# (w (B, style_dim)) -> (source prompt features (B, D), target prompt features (B, D))
PromptFeatures = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
# images (B, 3, H, W) in [-1, 1] -> raw CLIP image features (B, D), differentiable
ImageFeatures = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GANStage2Config:
    """Hyper-parameters of GAN-IPL's Stage 2 (defaults: IPL README / NADA, facts §1.2, §1.5).

    learning_rate: Adam's lr as used (upstream ``--lr 0.002`` times ``4/5`` = 0.0016).
    adam_beta2: ``0.99 ** (4/5)``; beta1 is 0.
    auto_layer_k: W+ rows (= layers) trained per iteration; None = IPL's ``--auto_compute``
        rule ``int(2 * n_latent / 3)`` (12 at 1024 px, 10 at 512, 9 at 256).
    auto_layer_chunk: probes rendered at a time in the layer selection (None: all
        ``auto_layer_batch`` at once, as upstream); same selection, lower peak memory.
    sample_truncation: psi of the sample grids (training always uses psi = 1).
    """

    iterations: int = 300
    batch_size: int = 2
    learning_rate: float = 0.002 * 4 / 5
    adam_beta2: float = 0.99 ** (4 / 5)
    ema_decay: float = 0.99
    lambda_direction: float = 1.0
    mixing: float = 0.0
    phase: Optional[str] = None
    auto_layer_iters: int = 1
    auto_layer_k: Optional[int] = None
    auto_layer_batch: int = 8
    auto_layer_lr: float = 0.01
    auto_layer_chunk: Optional[int] = None
    train_to_rgb: bool = False
    compat_layer_mapping: bool = False
    mixed_precision: str = "no"
    seed: int = 2
    checkpointing_steps: Optional[int] = None
    checkpoints_total_limit: Optional[int] = 2
    sample_steps: Optional[int] = None
    num_samples: int = 8
    sample_truncation: float = 0.7

    def validate(self):
        if self.iterations < 0 or self.batch_size < 1:
            raise ValueError(f"iterations must be >= 0 and batch_size >= 1, got {self.iterations}, {self.batch_size}")
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1], got {self.ema_decay}")
        if not 0.0 <= self.mixing <= 1.0:
            raise ValueError(f"mixing must lie in [0, 1], got {self.mixing}")
        if self.auto_layer_chunk is not None and self.auto_layer_chunk < 1:
            raise ValueError(f"auto_layer_chunk must be >= 1 or None, got {self.auto_layer_chunk}")
        if self.auto_layer_iters < 0 or (self.auto_layer_k is not None and self.auto_layer_k < 1):
            raise ValueError(f"auto_layer_iters must be >= 0 and auto_layer_k >= 1, got {self.auto_layer_iters}, {self.auto_layer_k}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


# --------------------------------------------------------------------------------------
# NADA's layer sets and adaptive selection
# --------------------------------------------------------------------------------------


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
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
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
    Returns:
        ``(module names to train, per-row scores (n_latent,))``; scores are
        ``mean |w+_after - w+_before|`` over batch and channels.
    """
    w_init = w.detach().unsqueeze(1).repeat(1, generator.n_latent, 1)
    batch = w_init.shape[0]
    chunk = chunk_size or batch
    codes = w_init.clone()
    for _ in range(iterations):
        grads = []
        for start in range(0, batch, chunk):
            part = codes[start : start + chunk].clone().requires_grad_(True)
            image = generator.synthesis(part, randomize_noise=randomize_noise)
            # global_loss averages over its images: rescale each chunk's mean to the batch mean.
            (grad,) = torch.autograd.grad(global_loss(image) * (part.shape[0] / batch), part)
            grads.append(grad)
        codes = (codes - lr * torch.cat(grads)).detach()
    scores = (codes - w_init).abs().mean(dim=-1).mean(dim=0)
    rows = candidate_rows(generator, train_to_rgb, compat)
    k = min(k, len(rows))
    ranked = torch.topk(scores[rows], k).indices.tolist()
    chosen = sorted(rows[i] for i in ranked)
    return trainable_module_names(generator, chosen, train_to_rgb, compat), scores


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` over parameters (IPL ``ema``).

    Written as ``lerp`` so parameters that did not change stay bit-identical.
    """
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)


def sample_z(batch: int, style_dim: int, mixing: float, rng: torch.Generator, device) -> list[torch.Tensor]:
    """``mixing_noise``: one ``z``, or two with probability ``mixing`` (style mixing)."""
    n = 2 if mixing > 0 and torch.rand((), generator=rng).item() < mixing else 1
    return [torch.randn(batch, style_dim, generator=rng).to(device) for _ in range(n)]


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


class GANIPLTrainer:
    """Stage 2 of GAN-IPL: fine-tunes a copy of ``source_generator`` (returned as ``g_ema``).

    Args:
        source_generator: the pretrained :class:`StyleGAN2Generator`; frozen in place
            (``eval()``, ``requires_grad_(False)``), its weights are never changed.
        prompt_features: ``w (B, style_dim)`` -> ``(source (B, D), target (B, D))`` prompt
            features ``E_T(M_s^i)``, ``E_T(M_t^i)`` of Eq. 8 (from Stage 1's latent mapper; a
            manual / learned-fixed scheme just repeats one row).
        image_features: differentiable CLIP image encoder, images ``(B, 3, H, W)`` in [-1, 1]
            -> raw features ``(B, D)``.
        target_text_features: ``(D,)`` E_T of the raw target label, for the adaptive layer
            selection's global loss; required when ``config.auto_layer_iters > 0``.
        config: :class:`GANStage2Config`.
        output_dir: where ``checkpoints/``, ``samples/`` and ``losses.csv`` go (None: nothing written).
        device: torch device (default: the source generator's).
        run_config: JSON-serialisable dict stored in every checkpoint.
    """

    def __init__(
        self,
        source_generator: StyleGAN2Generator,
        prompt_features: PromptFeatures,
        image_features: ImageFeatures,
        target_text_features: Optional[torch.Tensor] = None,
        config: Optional[GANStage2Config] = None,
        output_dir=None,
        device=None,
        run_config: Optional[dict] = None,
    ):
        from ipl_diffusion.losses import adaptive_directional_loss

        self.loss_fn = adaptive_directional_loss
        self.config = config = config or GANStage2Config()
        config.validate()
        self.device = torch.device(device) if device is not None else source_generator.device
        self.source = source_generator.to(self.device).eval().requires_grad_(False)
        self.generator = copy.deepcopy(self.source).train()
        self.generator_ema = copy.deepcopy(self.source).eval()
        self.prompt_features = prompt_features
        self.image_features = image_features
        if config.auto_layer_iters > 0:
            if target_text_features is None:
                raise ValueError("adaptive layer selection (auto_layer_iters > 0) needs target_text_features (E_T of the target label)")
            self.target_text = F.normalize(target_text_features.detach().reshape(1, -1).float().to(self.device), dim=-1)
        self.k = config.auto_layer_k or default_auto_layer_k(self.source)
        self.fixed_layers = nada_training_layers(self.generator, config.phase)
        set_trainable(self.generator, self.fixed_layers)
        # Every parameter goes to Adam; frozen ones simply never have a gradient.
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.learning_rate, betas=(0.0, config.adam_beta2))
        self.rng = torch.Generator().manual_seed(config.seed)
        if config.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError("mixed_precision='fp16' needs a CUDA device; use 'no' (or 'bf16') on a CPU")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
        # fp16 gradients of a GAN underflow without loss scaling; bf16 has fp32's range.
        self.scaler = torch.amp.GradScaler("cuda") if config.mixed_precision == "fp16" else None
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.run_config = run_config or {"stage2": asdict(config)}
        self.step = 0
        self.history: list[dict] = []
        self.last_layers: list[str] = list(self.fixed_layers)

    # -- pieces ------------------------------------------------------------------------

    def global_loss(self, images: torch.Tensor) -> torch.Tensor:
        """NADA's global CLIP loss ``mean(1 - cos(E_I(x), E_T(target label)))`` (layer selection only)."""
        feats = F.normalize(self.image_features(images).float(), dim=-1)
        return (1 - feats @ self.target_text.T).mean()

    def choose_layers(self) -> list[str]:
        cfg = self.config
        if cfg.auto_layer_iters == 0:
            return self.fixed_layers
        z = torch.randn(cfg.auto_layer_batch, self.source.style_dim, generator=self.rng).to(self.device)
        with torch.no_grad():
            w = self.source.get_latent(z)
        # The probe only needs d(loss)/d(w+): with every weight frozen, autograd keeps no
        # tensors for weight gradients, so the probe costs less time and memory.
        self.generator.requires_grad_(False)
        names, _ = select_layers(
            self.generator, w, self.global_loss, self.k, cfg.auto_layer_iters, cfg.auto_layer_lr, cfg.train_to_rgb, cfg.compat_layer_mapping, chunk_size=cfg.auto_layer_chunk
        )
        set_trainable(self.generator, names)
        return names

    def train_step(self) -> dict:
        """One iteration; returns ``{"loss": float, "layers": [...]}``."""
        cfg = self.config
        zs = sample_z(cfg.batch_size, self.source.style_dim, cfg.mixing, self.rng, self.device)
        with torch.no_grad():
            ws = [self.source.get_latent(z) for z in zs]
            # The mapper sees the first w of each image (IPL: sample_w[0]).
            src_text, tgt_text = self.prompt_features(ws[0])
        layers = self.choose_layers()
        inject = random.randint(1, self.source.n_latent - 1) if len(ws) > 1 else None
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else contextlib.nullcontext()
        with autocast:
            with torch.no_grad():
                src_img, _ = self.source(ws, input_is_latent=True, inject_index=inject)
                src_feat = self.image_features(src_img)
            tgt_img, _ = self.generator(ws, input_is_latent=True, inject_index=inject)
            tgt_feat = self.image_features(tgt_img)
        loss = cfg.lambda_direction * self.loss_fn(src_feat.float(), tgt_feat.float(), src_text.float(), tgt_text.float())
        if not torch.isfinite(loss):
            raise ValueError(f"GAN-IPL Stage 2 loss is {loss.item()} at iteration {self.step}; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        ema_update(self.generator_ema, self.generator, cfg.ema_decay)
        self.step += 1
        self.last_layers = list(layers)
        record = {"step": self.step, "loss": float(loss.detach())}
        self.history.append(record)
        return {**record, "layers": list(layers)}

    # -- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self) -> Optional[Path]:
        if self.output_dir is None:
            return None
        return checkpointing.save_checkpoint(
            self.output_dir / "checkpoints",
            self.step,
            models={"generator": self.generator, "generator_ema": self.generator_ema},
            optimizers={"generator": self.optimizer},
            config={**self.run_config, "history": self.history},
            generators={"stage2": self.rng},
            keep=self.config.checkpoints_total_limit,
        )

    def resume(self, checkpoint) -> int:
        """Restore from ``"latest"`` (in ``output_dir/checkpoints``) or a checkpoint folder; returns the step."""
        root = self.output_dir / "checkpoints" if self.output_dir is not None else Path(".")
        path = checkpointing.resolve_checkpoint(root, checkpoint)
        if path is None:
            return 0
        step, config = checkpointing.load_checkpoint(
            path, models={"generator": self.generator, "generator_ema": self.generator_ema}, optimizers={"generator": self.optimizer}, generators={"stage2": self.rng}
        )
        self.step = step
        self.history = list(config.get("history", []))
        return step

    # -- samples -----------------------------------------------------------------------

    @torch.no_grad()
    def sample_grid(self, n: Optional[int] = None, seed: int = 0):
        """PIL grid: source samples (top row) | adapted ``g_ema`` samples (bottom row); fixed
        ``z`` (``seed``), truncation ``sample_truncation``, fixed noise maps."""
        n = n or self.config.num_samples
        z = torch.randn(n, self.source.style_dim, generator=torch.Generator().manual_seed(seed)).to(self.device)
        centre = self.source.mean_latent()
        kwargs = dict(truncation=self.config.sample_truncation, truncation_latent=centre, randomize_noise=False)
        w = self.source.get_latent(z)
        top, _ = self.source([w], input_is_latent=True, **kwargs)
        bottom, _ = self.generator_ema([w], input_is_latent=True, **kwargs)
        return image_grid(torch.cat([top, bottom]), rows=2)

    def _write_samples(self):
        if self.output_dir is None:
            return
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        self.sample_grid().save(folder / f"iter_{self.step:06d}.png")

    # -- loop --------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, progress: bool = True) -> StyleGAN2Generator:
        """Run to ``config.iterations``; returns ``g_ema`` (the adapted generator, eval mode)."""
        from tqdm.auto import tqdm

        cfg = self.config
        if resume_from_checkpoint is not None:
            self.resume(resume_from_checkpoint)
        log = None
        if self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.output_dir / "losses.csv", "a")
            if log.tell() == 0:
                log.write("step,loss\n")
        try:
            bar = tqdm(range(self.step, cfg.iterations), initial=self.step, total=cfg.iterations, disable=not progress, desc="GAN-IPL stage 2")
            for _ in bar:
                out = self.train_step()
                bar.set_postfix(loss=f"{out['loss']:.4f}")
                if log is not None:
                    log.write(f"{out['step']},{out['loss']:.6g}\n")
                    log.flush()
                if cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
                if cfg.sample_steps and self.step % cfg.sample_steps == 0:
                    self._write_samples()
        finally:
            if log is not None:
                log.close()
        self.generator_ema.eval()
        return self.generator_ema


# --------------------------------------------------------------------------------------
# Stage 1 + Stage 2
# --------------------------------------------------------------------------------------


@dataclass
class GANIPLResult:
    """What :func:`adapt_stylegan2` returns: the adapted ``g_ema``, Stage 1's prompt module
    (``LatentMapper`` or ``SharedPromptContext``), the Stage 2 loss history and the run options."""

    generator: StyleGAN2Generator
    mapper: Optional[torch.nn.Module]
    history: list
    run_config: dict


@torch.no_grad()
def source_cache(source_generator: StyleGAN2Generator, image_features: ImageFeatures, num_images: int, seed: int, chunk: int = 16):
    """Stage 1's cache: ``w (N, style_dim)`` from the mapping network (no truncation, the
    mapper's input as in IPL) and the CLIP features ``(N, D)`` of ``G_s(w)`` (fixed noise)."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(num_images, source_generator.style_dim, generator=rng).to(source_generator.device)
    ws, feats = [], []
    for i in range(0, num_images, chunk):
        w = source_generator.get_latent(z[i : i + chunk])
        image, _ = source_generator([w], input_is_latent=True, randomize_noise=False)
        ws.append(w)
        feats.append(image_features(image).float())
    return torch.cat(ws), torch.cat(feats)


STAGE1_DIR = "stage1"


def _save_stage1(output_dir, key: dict, learner) -> None:
    """Keep Stage 1's result beside the Stage 2 checkpoints (safetensors + JSON), so a resumed
    run reuses it instead of training the mapper again."""
    if output_dir is None:
        return
    folder = Path(output_dir) / STAGE1_DIR
    learner.save_pretrained(folder)
    tmp = folder / "options.json.tmp"
    tmp.write_text(json.dumps(key, sort_keys=True, default=str))
    os.replace(tmp, folder / "options.json")


def _load_stage1(output_dir, key: dict, encoder):
    """The saved Stage 1 result when it was made with exactly these options, else None."""
    from ipl_diffusion.prompt_learning import PromptLearner

    if output_dir is None:
        return None
    folder = Path(output_dir) / STAGE1_DIR
    options = folder / "options.json"
    if not options.is_file() or json.loads(options.read_text()) != json.loads(json.dumps(key, sort_keys=True, default=str)):
        return None
    learner = PromptLearner.from_pretrained(str(folder), encoder)
    learner.prompt_module.to(encoder.device)
    return learner


def adapt_stylegan2(
    source_generator: StyleGAN2Generator,
    clip_model,
    tokenizer,
    source: str,
    target: str,
    stage1: Optional[dict] = None,
    stage2: Optional[GANStage2Config] = None,
    feature_extractor=None,
    output_dir=None,
    resume_from_checkpoint=None,
    progress: bool = True,
    base_model: Optional[str] = None,
) -> GANIPLResult:
    """GAN-IPL end to end: Stage 1 on cached source samples, then Stage 2.

    Args:
        source_generator: the pretrained generator (frozen in place, weights unchanged).
        clip_model, tokenizer, feature_extractor: ``transformers`` CLIP parts (CLIP is frozen).
        source, target: domain labels.
        stage1: keyword arguments of :func:`ipl_diffusion.prompt_learning.learn_prompts`
            (``scheme`` manual / learned / random / adaptive, ``lambda_domain``,
            ``num_iterations``, ``batch_size``, ``learning_rate``, ``n_ctx``, ...) plus
            ``num_images``, the size of the cache of source samples (default 256).
        stage2: :class:`GANStage2Config`.
    """
    from transformers import CLIPImageProcessor

    from ipl_diffusion.clip_image import CLIPImageEncoder
    from ipl_diffusion.clip_text import CLIPPromptEncoder
    from ipl_diffusion.prompt_learning import learn_prompts

    stage1 = dict(stage1 or {})
    stage2 = stage2 or GANStage2Config()
    stage2.validate()
    num_images = int(stage1.pop("num_images", 256))
    device = source_generator.device
    clip_model.to(device)
    encoder = CLIPPromptEncoder(clip_model, tokenizer)
    source, target = encoder.validate_label(source), encoder.validate_label(target)
    image_features = CLIPImageEncoder(clip_model, feature_extractor or CLIPImageProcessor()).encode_images

    stage1_key = {"source": source, "target": target, "seed": stage2.seed, "num_images": num_images, **stage1}
    learner = _load_stage1(output_dir, stage1_key, encoder) if resume_from_checkpoint is not None else None
    if learner is None:
        latents, features = source_cache(source_generator, image_features, num_images, stage2.seed)
        learner = learn_prompts(encoder, latents, source, target, image_features=features, seed=stage2.seed, progress=progress, **stage1)
        _save_stage1(output_dir, stage1_key, learner)

    def prompt_features(w):
        return learner.text_features(w, source), learner.text_features(w, target)

    with torch.no_grad():
        target_text = encoder.encode_text([target])[0]
    run_config = {
        "backend": "stylegan2",
        "source": source,
        "target": target,
        "base_model": base_model,
        "stage1": {**stage1, "num_images": num_images},
        "stage2": asdict(stage2),
    }
    trainer = GANIPLTrainer(source_generator, prompt_features, image_features, target_text, stage2, output_dir=output_dir, run_config=run_config)
    g_ema = trainer.train(resume_from_checkpoint=resume_from_checkpoint, progress=progress)
    # The prompt module: a LatentMapper (adaptive / random) or the shared context (learned / manual).
    return GANIPLResult(generator=g_ema.requires_grad_(False), mapper=learner.prompt_module, history=trainer.history, run_config=run_config)


def image_grid(images: torch.Tensor, rows: int):
    """``(N, 3, H, W)`` in [-1, 1] -> one PIL image, ``rows`` rows filled left to right."""
    from PIL import Image

    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, _, h, w = images.shape
    cols = math.ceil(n / rows)
    canvas = torch.full((3, rows * h, cols * w), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())
