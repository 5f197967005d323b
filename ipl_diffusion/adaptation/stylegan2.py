"""GAN-IPL: IPL's Stage 2 (Eq. 7-9) on StyleGAN2, with StyleGAN-NADA's layer freezing.

Set-up (IPL's ``train.py`` / ``model/ZSSGAN.py``, from StyleGAN-NADA): a frozen *source* generator
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

The first step. At step 0 ``G_t = G_s``: the two renders of one ``w`` differ only by their
fresh noise maps (as in NADA), so ``ΔI_i`` is tiny and the normalised loss's gradient, which
grows like ``1 / |ΔI_i|``, was 50-400 times the later ones on the Shapes GAN. Adam's second
moment then kept that spike for the whole run, shrinking every later step. The gradient norm
is clipped (``max_grad_norm``, 1 by default) so that no single step dominates.

The selection's gradient is taken with ``torch.autograd.grad`` with respect to the W+ codes
only, so unlike upstream it leaves no gradients behind in the generator or in CLIP.

Optimiser (upstream): Adam, ``lr = 0.002 * 4/5 = 0.0016``, ``betas = (0, 0.99 ** (4/5))``
(rosinality's lazy-regularisation scaling with ``g_reg_every = 4``). Frozen layers get no
gradient (``zero_grad(set_to_none=True)``), so Adam leaves them untouched.

Accelerate, as the Diff-IPL trainer (shared plumbing in
:mod:`ipl_diffusion.adaptation.distributed`): the device and mixed precision come from an
``Accelerator`` (default: :func:`~ipl_diffusion.adaptation.distributed.make_accelerator`, on
the source generator's device; fp16 needs a GPU), the optimiser is ``accelerator.prepare``-d
(fp16 then scales the loss), and the forward passes run under ``accelerator.autocast()``.
Under ``accelerate launch`` every process renders its own share of each iteration's global
batch of ``batch_size * num_processes`` latents and of the layer-selection probes; gradients
are averaged with one all-reduce. ``G_t`` is not wrapped in DDP because the set of layers
that require a gradient changes every iteration, which DDP's reducer does not allow; the
layer choice itself is made from the probe scores summed over all processes, so every
process trains the same layers.

Randomness: ``z``, the probes and the style-mixing draws come from one ``torch.Generator``
seeded by ``seed`` and identical on every process (each takes its slice of the global draws);
the per-layer noise maps are drawn from the global RNG *forked* for each iteration and seeded
by ``(seed, iteration, process index)``. So a run is a function of its seed, training does
not consume the caller's global RNG, and a resumed run -- on one process or several --
continues bit for bit (on a GPU, as far as its kernels are deterministic).

Checkpoints: ``output_dir/checkpoints/checkpoint-<step>`` via :mod:`ipl_diffusion.checkpointing`
(safetensors + JSON, atomic; written by the main process between two
``accelerator.wait_for_everyone()``) with ``G_t``, ``g_ema``, the optimiser, the fp16 loss
scale, the seeded ``torch.Generator`` and the global RNG states. Accelerate's ``save_state`` is not used
because it pickles the optimizer and RNG states. Stage 1's result is kept in
``output_dir/stage1`` and reused on resume. Sample grids (source row | adapted row, fixed
``z``, truncation 0.7, fixed noise) go to ``output_dir/samples/``.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ipl_diffusion import checkpointing
from ipl_diffusion.grids import labelled_grid
from ipl_diffusion.adaptation.distributed import (
    MIXED_PRECISION,
    average_gradients,
    check_weights_dtype,
    gather_in_order,
    make_accelerator,
    mean_over_processes,
    shard_indices,
)
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator

PHASES = (None, "texture", "shape", "no_fine", "shape_expanded", "all")

# (w (B, style_dim)) -> (source prompt features (B, D), target prompt features (B, D))
PromptFeatures = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
# images (B, 3, H, W) in [-1, 1] -> raw CLIP image features (B, D), differentiable
ImageFeatures = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GANStage2Config:
    """Hyper-parameters of GAN-IPL's Stage 2 (defaults: IPL's README and ``options/train_options.py``).

    iterations, batch_size: Stage 2 iterations, each on ``batch_size`` latents per process
        (IPL: 300, 2).
    learning_rate: Adam's lr as used (upstream ``--lr 0.002`` times ``4/5`` = 0.0016).
    adam_beta2: ``0.99 ** (4/5)``; beta1 is 0.
    lambda_direction: weight of the adaptive directional loss (Eq. 7-9).
    auto_layer_k: W+ rows (= layers) trained per iteration; None = IPL's ``--auto_compute``
        rule ``int(2 * n_latent / 3)`` (12 at 1024 px, 10 at 512, 9 at 256).
    auto_layer_chunk: probes rendered at a time in the layer selection (None: all
        ``auto_layer_batch`` at once, as upstream); same selection, lower peak memory.
    mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (GPU only); used when the trainer
        makes its own ``Accelerator`` (a given one brings its own setting).
    max_grad_norm: clip the gradient norm of the trained layers (1; None: off, as IPL / NADA;
        see "The first step" above for why it is on).
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
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0
    checkpointing_steps: Optional[int] = None
    checkpoints_total_limit: Optional[int] = 2
    sample_steps: Optional[int] = None
    num_samples: int = 8
    sample_truncation: float = 0.7

    def validate(self):
        """Raise ``ValueError`` naming the first option out of range."""
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
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):  # NaN fails both
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")


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


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` over parameters (IPL ``ema``).

    Written as ``lerp`` so parameters that did not change stay bit-identical.
    """
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - decay)


def sample_z(batch: int, style_dim: int, mixing: float, rng: torch.Generator, device, world: int = 1, rank: int = 0) -> list[torch.Tensor]:
    """``mixing_noise``: one ``z``, or two with probability ``mixing`` (style mixing).

    Draws the global batch of ``batch * world`` rows from the CPU generator ``rng`` (the same
    on every process) and returns process ``rank``'s rows (every ``world``-th), so processes
    sharing a seed never draw the same ``z``. Returns a list of 1 or 2 ``(batch, style_dim)``
    float32 tensors on ``device``, N(0, 1).
    """
    n = 2 if mixing > 0 and torch.rand((), generator=rng).item() < mixing else 1
    return [torch.randn(batch * world, style_dim, generator=rng)[rank::world].to(device) for _ in range(n)]


# --------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------


class GANIPLTrainer:
    """Stage 2 of GAN-IPL: fine-tunes a copy of ``source_generator`` (returned as ``g_ema``).

    Args:
        source_generator: the pretrained :class:`StyleGAN2Generator`; moved to the
            accelerator's device and frozen in place (``eval()``, ``requires_grad_(False)``),
            its weights are never changed.
        prompt_features: ``w (B, style_dim)`` -> ``(source (B, D), target (B, D))`` prompt
            features ``E_T(M_s^i)``, ``E_T(M_t^i)`` of Eq. 8 (from Stage 1's latent mapper; a
            manual / learned-fixed scheme just repeats one row). Called under ``no_grad``.
        image_features: differentiable CLIP image encoder, images ``(B, 3, H, W)`` in [-1, 1]
            -> raw features ``(B, D)``. Its parameters receive no gradient (the backward pass
            is restricted to ``G_t``'s trained layers).
        target_text_features: ``(D,)`` E_T of the raw target label, for the adaptive layer
            selection's global loss; required when ``config.auto_layer_iters > 0``.
        config: :class:`GANStage2Config`.
        output_dir: where ``checkpoints/``, ``samples/`` and ``losses.csv`` go (None: nothing written).
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator` with
            ``config.mixed_precision`` on ``device``).
        run_config: JSON-serialisable dict stored in every checkpoint.
        device: only for callers from before the Accelerate port (``benchmarks/stylegan_step.py``):
            the device of the default accelerator (default: the source generator's).

    Raises:
        ValueError: an option out of range (:meth:`GANStage2Config.validate`), fp16 without a
            GPU, adaptive layer selection without ``target_text_features``, or a ``device``
            that is not the given accelerator's.
    """

    def __init__(
        self,
        source_generator: StyleGAN2Generator,
        prompt_features: PromptFeatures,
        image_features: ImageFeatures,
        target_text_features: Optional[torch.Tensor] = None,
        config: Optional[GANStage2Config] = None,
        output_dir=None,
        accelerator=None,
        run_config: Optional[dict] = None,
        device=None,
    ):
        from ipl_diffusion.losses import adaptive_directional_loss

        self.loss_fn = adaptive_directional_loss
        self.config = config = config or GANStage2Config()
        config.validate()
        if config.auto_layer_iters > 0 and target_text_features is None:
            raise ValueError("adaptive layer selection (auto_layer_iters > 0) needs target_text_features (E_T of the target label)")
        wanted = torch.device(device) if device is not None else None
        if accelerator is not None and wanted is not None and (
            wanted.type != accelerator.device.type or wanted.index not in (None, accelerator.device.index)
        ):
            raise ValueError(f"device {str(device)!r} is not the accelerator's device {str(accelerator.device)!r}; pass one of the two")
        self.accelerator = accelerator or make_accelerator(config.mixed_precision, device if device is not None else source_generator.device)
        self.device = self.accelerator.device
        self.source = source_generator.to(self.device).eval().requires_grad_(False)
        self.generator = copy.deepcopy(self.source).train()
        self.generator_ema = copy.deepcopy(self.source).eval()
        self.prompt_features = prompt_features
        self.image_features = image_features
        if config.auto_layer_iters > 0:
            self.target_text = F.normalize(target_text_features.detach().reshape(1, -1).float().to(self.device), dim=-1)
        self.k = config.auto_layer_k or default_auto_layer_k(self.source)
        self.fixed_layers = nada_training_layers(self.generator, config.phase)
        set_trainable(self.generator, self.fixed_layers)
        # Every parameter goes to Adam; frozen ones simply never have a gradient. prepare()
        # adds the fp16 loss scaling (a GAN's fp16 gradients underflow without it).
        optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.learning_rate, betas=(0.0, config.adam_beta2))
        self.optimizer = self.accelerator.prepare(optimizer)
        # Same seed on every process: z, probes and mixing draws agree, each process slices its share.
        self.rng = torch.Generator().manual_seed(config.seed)
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
        """This iteration's trained modules (NADA's adaptive selection, or the fixed ``phase``
        set), identical on every process; leaves exactly them ``requires_grad``."""
        cfg, acc = self.config, self.accelerator
        if cfg.auto_layer_iters == 0:
            return self.fixed_layers
        z = torch.randn(cfg.auto_layer_batch, self.source.style_dim, generator=self.rng)
        mine = z[acc.process_index :: acc.num_processes].to(self.device)
        # The probe only needs d(loss)/d(w+): with every weight frozen, autograd keeps no
        # tensors for weight gradients, so the probe costs less time and memory.
        self.generator.requires_grad_(False)
        if len(mine):
            with torch.no_grad():
                w = self.source.get_latent(mine)
            _, scores = select_layers(
                self.generator, w, self.global_loss, self.k, cfg.auto_layer_iters, cfg.auto_layer_lr, cfg.train_to_rgb,
                cfg.compat_layer_mapping, chunk_size=cfg.auto_layer_chunk, global_batch=cfg.auto_layer_batch,
            )
        else:  # more processes than probes: this one has no share
            scores = torch.zeros(self.source.n_latent, device=self.device)
        if acc.num_processes > 1:
            # Size-weighted sum of the shares' means = the whole batch's mean; the all-reduce
            # gives every process the same scores, hence the same layers (average_gradients
            # needs the same parameters to have gradients everywhere).
            scores = acc.reduce(scores.float() * len(mine), reduction="sum") / cfg.auto_layer_batch
        names = rank_layers(self.generator, scores, self.k, cfg.train_to_rgb, cfg.compat_layer_mapping)
        set_trainable(self.generator, names)
        return names

    @contextlib.contextmanager
    def _iteration_noise(self):
        """Fork the global RNG (CPU and this device) and seed it by ``(seed, step, process)``.

        The noise maps of every render (``randomize_noise``) come from the global RNG. Seeding
        it per iteration makes them a function of the run's seed on every process -- only the
        main process's RNG state could go into a checkpoint -- and forking leaves the caller's
        RNG state as it was.
        """
        cuda = self.device.type == "cuda"
        index = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
        seed = ((self.config.seed * 1_000_003 + self.step) * 1_009 + self.accelerator.process_index) % (2**63)
        with torch.random.fork_rng(devices=[index] if cuda else []):
            torch.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
            yield

    def train_step(self) -> dict:
        """One iteration: this process's ``batch_size`` latents, the adaptive directional loss
        (Eq. 7-9) ``mean_i 1 - cos(ΔI_i, ΔT_i)``, one averaged Adam update of the chosen
        layers and the EMA.

        Returns ``{"step": int, "loss": float (mean over processes), "layers": [...]}``.
        Raises ``ValueError`` (on every process at once) when the loss is NaN / inf.
        """
        cfg, acc = self.config, self.accelerator
        with self._iteration_noise():
            zs = sample_z(cfg.batch_size, self.source.style_dim, cfg.mixing, self.rng, self.device, acc.num_processes, acc.process_index)
            with torch.no_grad():
                ws = [self.source.get_latent(z) for z in zs]
                # The mapper sees the first w of each image (IPL: sample_w[0]).
                src_text, tgt_text = self.prompt_features(ws[0])
            layers = self.choose_layers()
            # From the shared generator, not Python's RNG: every process mixes at the same layer.
            inject = int(torch.randint(1, self.source.n_latent, (), generator=self.rng)) if len(ws) > 1 else None
            with acc.autocast():
                with torch.no_grad():
                    src_img, _ = self.source(ws, input_is_latent=True, inject_index=inject)
                    src_feat = self.image_features(src_img)
                tgt_img, _ = self.generator(ws, input_is_latent=True, inject_index=inject)
                tgt_feat = self.image_features(tgt_img)
        loss = cfg.lambda_direction * self.loss_fn(src_feat.float(), tgt_feat.float(), src_text.float(), tgt_text.float())
        # Checked on the mean over processes so that all raise together (one alone would leave
        # the others waiting in the gradient all-reduce).
        value = mean_over_processes({"loss": float(loss.detach())}, acc)["loss"]
        if not math.isfinite(value):
            raise ValueError(f"GAN-IPL Stage 2 loss is {value} at iteration {self.step}; lower the learning rate or turn mixed precision off")
        # inputs=: gradients only for G_t's chosen layers, never for CLIP (whatever its
        # requires_grad), which the loss also passes through.
        trainable = [p for p in self.generator.parameters() if p.requires_grad]
        acc.backward(loss, inputs=trainable)
        average_gradients(trainable, acc)
        # An infinite bound only measures: clip_grad_norm_ returns the norm either way.
        grad_norm = float(acc.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # frozen-next-time layers must have no gradient
        ema_update(self.generator_ema, self.generator, cfg.ema_decay)
        self.step += 1
        self.last_layers = list(layers)
        record = {"step": self.step, "loss": value, "grad_norm": grad_norm}
        self.history.append(record)
        return {**record, "layers": list(layers)}

    # -- checkpoints -------------------------------------------------------------------

    def save_checkpoint(self) -> Optional[Path]:
        """Write ``output_dir/checkpoints/checkpoint-<step>`` (main process; every process must
        call this). Returns the folder on the main process, else None."""
        if self.output_dir is None:
            return None
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            state = {**self.run_config, "history": self.history}
            if acc.scaler is not None:  # fp16: the loss scale is part of the training state
                state["grad_scaler"] = acc.scaler.state_dict()
            path = checkpointing.save_checkpoint(
                self.output_dir / "checkpoints",
                self.step,
                models={"generator": acc.unwrap_model(self.generator), "generator_ema": acc.unwrap_model(self.generator_ema)},
                optimizers={"generator": self.optimizer.optimizer},
                config=state,
                generators={"stage2": self.rng},
                keep=self.config.checkpoints_total_limit,
            )
        # Nobody goes on (and e.g. resumes from "latest") before the folder is in place.
        acc.wait_for_everyone()
        return path

    def resume(self, checkpoint) -> int:
        """Restore from ``"latest"`` (in ``output_dir/checkpoints``; none yet: a fresh start) or
        a checkpoint folder, on every process; returns the step.

        Raises ``FileNotFoundError`` for a named checkpoint that does not exist and
        ``ValueError`` for one from a different architecture.
        """
        root = self.output_dir / "checkpoints" if self.output_dir is not None else Path(".")
        path = checkpointing.resolve_checkpoint(root, checkpoint)
        if path is None:
            return self.step
        step, state = checkpointing.load_checkpoint(
            path,
            models={"generator": self.generator, "generator_ema": self.generator_ema},
            optimizers={"generator": self.optimizer.optimizer},
            generators={"stage2": self.rng},
        )
        checkpointing.check_same_run(path, state, self.run_config)
        if self.accelerator.scaler is not None and state.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        self.step = step
        self.history = list(state.get("history", []))
        return step

    # -- samples -----------------------------------------------------------------------

    @torch.no_grad()
    def sample_grid(self, n: Optional[int] = None, seed: int = 0):
        """Labelled PIL grid: source samples (top row) | adapted ``g_ema`` samples (bottom row); fixed
        ``z`` (``seed``), truncation ``sample_truncation``, fixed noise maps."""
        n = n or self.config.num_samples
        z = torch.randn(n, self.source.style_dim, generator=torch.Generator().manual_seed(seed)).to(self.device)
        centre = self.source.mean_latent()
        kwargs = dict(truncation=self.config.sample_truncation, truncation_latent=centre, randomize_noise=False)
        w = self.source.get_latent(z)
        top, _ = self.source([w], input_is_latent=True, **kwargs)
        bottom, _ = self.generator_ema([w], input_is_latent=True, **kwargs)
        return labelled_grid([top, bottom], ["source G_s(z)", f"g_ema, step {self.step}"])

    def _write_samples(self):
        if self.output_dir is None:
            return
        folder = self.output_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        self.sample_grid().save(folder / f"iter_{self.step:06d}.png")

    def _open_loss_log(self):
        """``losses.csv`` rewritten from the (checkpointed) history: after a resume it holds
        exactly the steps of the run being continued, not rows logged after its last checkpoint."""
        if self.output_dir is None:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.output_dir / "losses.csv", "w")
        log.write("step,loss,grad_norm\n")
        for record in self.history:
            log.write(f"{record['step']},{record['loss']:.6g},{record.get('grad_norm', float('nan')):.6g}\n")
        return log

    # -- loop --------------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, progress: bool = True) -> StyleGAN2Generator:
        """Run to ``config.iterations``; returns ``g_ema`` (the adapted generator, eval mode).

        Every process must call this. Only the main process writes ``losses.csv``,
        checkpoints and sample grids.
        """
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        if resume_from_checkpoint is not None:
            self.resume(resume_from_checkpoint)
        elif self.output_dir is not None:
            checkpointing.refuse_foreign_checkpoints(self.output_dir / "checkpoints")
        log = self._open_loss_log() if acc.is_main_process else None
        bar = tqdm(total=cfg.iterations, initial=self.step, disable=not (progress and acc.is_local_main_process), desc="GAN-IPL stage 2")
        try:
            while self.step < cfg.iterations:
                out = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}")
                if log is not None:
                    log.write(f"{out['step']},{out['loss']:.6g},{out['grad_norm']:.6g}\n")
                    log.flush()
                if cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0:
                    self.save_checkpoint()
                if cfg.sample_steps and self.step % cfg.sample_steps == 0 and acc.is_main_process:
                    self._write_samples()
        finally:
            bar.close()
            if log is not None:
                log.close()
        acc.wait_for_everyone()
        return acc.unwrap_model(self.generator_ema).eval()


# --------------------------------------------------------------------------------------
# Stage 1 + Stage 2
# --------------------------------------------------------------------------------------


@dataclass
class GANIPLResult:
    """What :func:`adapt_stylegan2` returns: the adapted ``g_ema``, Stage 1's prompt module
    (``LatentMapper`` or ``SharedPromptContext``), the Stage 2 loss history, the run options,
    and whether this is the main process (the one that writes files)."""

    generator: StyleGAN2Generator
    mapper: Optional[torch.nn.Module]
    history: list
    run_config: dict
    is_main_process: bool = True


@torch.no_grad()
def source_cache(source_generator: StyleGAN2Generator, image_features: ImageFeatures, num_images: int, seed: int, chunk: int = 16, accelerator=None):
    """Stage 1's cache: ``w (N, style_dim)`` from the mapping network (no truncation, the
    mapper's input as in IPL) and the raw CLIP features ``(N, D)`` float32 of ``G_s(w)``
    (fixed noise), both on the generator's device; ``z`` is N(0, 1) from ``seed``.

    With several processes each renders every ``world``-th sample (:func:`shard_indices`) and
    the shares are gathered, so every process ends with the whole cache, in ``z`` order.
    """
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(num_images, source_generator.style_dim, generator=rng)
    mine, order = shard_indices(num_images, accelerator)
    ws, feats = [], []
    for i in range(0, len(mine), chunk):
        w = source_generator.get_latent(z[mine[i : i + chunk]].to(source_generator.device))
        image, _ = source_generator([w], input_is_latent=True, randomize_noise=False)
        ws.append(w)
        feats.append(image_features(image).float())
    device = source_generator.device
    return gather_in_order(torch.cat(ws), order, num_images, accelerator).to(device), gather_in_order(torch.cat(feats), order, num_images, accelerator).to(device)


STAGE1_DIR = "stage1"
# Fresh latents Stage 1 never trains on, for its held-out prompt retrieval (batches of 32).
HELDOUT_LATENTS = 256


def run_stage1(source_generator, encoder, image_features, source, target, options: dict, num_images, seed, progress, accelerator=None):
    """Stage 1 (Eq. 6) for GAN-IPL; returns the ``PromptLearner``.

    ``num_images=None``: fresh ``w`` every iteration, rendered by ``G_s`` and encoded (the
    released code; the mapper then generalises to the fresh ``w`` of Stage 2). An int: a
    fixed pool of that many samples, encoded once. ``HELDOUT_LATENTS`` further samples from
    another stream of ``seed`` measure the held-out prompt retrieval.
    """
    from ipl_diffusion.prompt_learning import learn_prompts

    heldout = source_cache(source_generator, image_features, HELDOUT_LATENTS, seed + 20_011, accelerator=accelerator)
    if num_images is None:
        @torch.no_grad()
        def sample_latents(batch, rng):
            z = torch.randn(batch, source_generator.style_dim, generator=rng)
            return source_generator.get_latent(z.to(source_generator.device))

        def generate(w):
            return source_generator([w], input_is_latent=True, randomize_noise=False)[0]

        return learn_prompts(encoder, None, source, target, generate=generate, sample_latents=sample_latents,
                             heldout=heldout, seed=seed, progress=progress, **options)
    latents, features = source_cache(source_generator, image_features, int(num_images), seed, accelerator=accelerator)
    return learn_prompts(encoder, latents, source, target, image_features=features, heldout=heldout, seed=seed,
                         progress=progress, **options)


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
    accelerator=None,
) -> GANIPLResult:
    """GAN-IPL end to end: Stage 1 (Eq. 6) on cached source samples, then Stage 2 (Eq. 7-9).

    Args:
        source_generator: the pretrained generator (moved to the accelerator's device and
            frozen in place, weights unchanged).
        clip_model, tokenizer, feature_extractor: ``transformers`` CLIP parts (CLIP is frozen;
            moved to the accelerator's device).
        source, target: domain labels.
        stage1: keyword arguments of :func:`ipl_diffusion.prompt_learning.learn_prompts`
            (``scheme`` manual / learned / random / adaptive, ``lambda_domain``,
            ``num_iterations``, ``batch_size``, ``learning_rate``, ``n_ctx``, ...) plus
            ``num_images``: ``None`` (default) draws fresh source samples every iteration
            (the released code); an int uses a fixed pool of that many.
        stage2: :class:`GANStage2Config`.
        output_dir: when given, ``stage1/`` (the prompt module), ``checkpoints/``,
            ``samples/`` and ``losses.csv`` go there (main process only) and
            ``resume_from_checkpoint="latest"`` continues an interrupted run bit for bit.
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator` with
            ``stage2.mixed_precision`` on the source generator's device).

    Multi-process (``accelerate launch``): the cache of source samples is rendered in shares
    and gathered (:func:`source_cache`); Stage 1 itself then runs on every process with the
    same seed and the same gathered cache, so all end with the same prompts without a
    broadcast. Splitting Stage 1 is not worth it: it optimises a small mapper on cached
    features (no generator in the loop), and its contrastive loss (Eq. 3-4) takes the
    negatives from the whole batch, so shares would have to exchange features every step.

    Raises:
        ValueError: bad labels or options, fp16 without a GPU, a non-finite Stage-2 loss.
        FloatingPointError: a non-finite Stage-1 loss (prompt learning names the term).
    """
    from transformers import CLIPImageProcessorPil

    from ipl_diffusion.clip_image import CLIPImageEncoder
    from ipl_diffusion.clip_text import CLIPPromptEncoder

    stage1 = dict(stage1 or {})
    stage2 = stage2 or GANStage2Config()
    stage2.validate()
    if output_dir is not None:  # before Stage 1 writes anything
        checkpointing.check_before_run(Path(output_dir) / "checkpoints", resume_from_checkpoint)
    num_images = stage1.pop("num_images", None)
    accelerator = accelerator or make_accelerator(stage2.mixed_precision, source_generator.device)
    device = accelerator.device
    check_weights_dtype({"generator": source_generator, "text_encoder": clip_model}, device)
    source_generator.to(device)
    clip_model.to(device)
    processor = feature_extractor or CLIPImageProcessorPil()
    # The encoder's image processor serves Stage 1's fresh renders; image_features, Stage 2.
    encoder = CLIPPromptEncoder(clip_model, tokenizer, image_processor=processor)
    source, target = encoder.validate_label(source), encoder.validate_label(target)
    image_features = CLIPImageEncoder(clip_model, processor).encode_images

    stage1_key = {"source": source, "target": target, "seed": stage2.seed, "num_images": num_images, **stage1}
    learner = _load_stage1(output_dir, stage1_key, encoder) if resume_from_checkpoint is not None else None
    if learner is None:
        learner = run_stage1(source_generator, encoder, image_features, source, target, stage1, num_images,
                             stage2.seed, progress and accelerator.is_local_main_process, accelerator)
        if accelerator.is_main_process:
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
        "seed": stage2.seed,
        "num_processes": accelerator.num_processes,
        "stage1": {**stage1, "num_images": num_images, "heldout_images": HELDOUT_LATENTS,
                   "heldout_retrieval": learner.heldout_retrieval, "retrieval_chance": 1 / 32},
        "stage2": asdict(stage2),
    }
    trainer = GANIPLTrainer(
        source_generator, prompt_features, image_features, target_text, stage2, output_dir=output_dir,
        accelerator=accelerator, run_config=run_config,
    )
    g_ema = trainer.train(resume_from_checkpoint=resume_from_checkpoint, progress=progress)
    # The prompt module: a LatentMapper (adaptive / random) or the shared context (learned / manual).
    return GANIPLResult(
        generator=g_ema.requires_grad_(False), mapper=learner.prompt_module, history=trainer.history,
        run_config=run_config, is_main_process=accelerator.is_main_process,
    )
