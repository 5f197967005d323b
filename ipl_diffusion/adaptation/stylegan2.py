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

Automatic step choice (``candidate_steps``, :mod:`ipl_diffusion.adaptation.step_choice`):
candidates are ``g_ema`` snapshots, scored on ``num_candidate_images`` fixed held-out ``z``
(:meth:`GANIPLTrainer.candidate_images`) along the labels' template-averaged text direction.

:func:`adapt_stylegan2` runs both stages: Stage 1 (Eq. 6, :mod:`ipl_diffusion.prompt_learning`)
on a cache of source samples -- ``w`` from the mapping network as the mapper input (Eq. 2) and
the CLIP features of ``G_s(w)`` computed once -- then Stage 2 with this module's trainer.
"""

from __future__ import annotations

import copy
import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ipl_diffusion import checkpointing
from ipl_diffusion.adaptation import image_target
from ipl_diffusion.adaptation import stage1 as stage1_store
from ipl_diffusion.adaptation.distributed import (
    average_gradients,
    check_weights_dtype,
    gather_in_order,
    make_accelerator,
    mean_over_processes,
    shard_indices,
)
from ipl_diffusion.adaptation.stylegan2_layers import (  # noqa: F401  (public names of GAN-IPL)
    candidate_rows,
    default_auto_layer_k,
    nada_training_layers,
    rank_layers,
    select_layers,
    set_trainable,
    trainable_module_names,
)
from ipl_diffusion.adaptation.trainer import Trainer
from ipl_diffusion.configs import GANStage2Config, Stage1Config, as_dict, resolve_configs
from ipl_diffusion.errors import UserError, check_finite
from ipl_diffusion.grids import labelled_grid
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator


# The step choice's held-out z come from seed + this (Stage 1's held-out latents: seed + 20_011).
HELDOUT_Z_OFFSET = 40_009

# (w (B, style_dim)) -> (source prompt features (B, D), target prompt features (B, D))
PromptFeatures = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
# images (B, 3, H, W) in [-1, 1] -> raw CLIP image features (B, D), differentiable
ImageFeatures = Callable[[torch.Tensor], torch.Tensor]


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
# Stage 2
# --------------------------------------------------------------------------------------


class GANIPLTrainer(Trainer):
    """Stage 2 of GAN-IPL: fine-tunes a copy of ``source_generator`` (returned as ``g_ema``).

    Args:
        source_generator: the pretrained :class:`StyleGAN2Generator`; moved to the
            accelerator's device and frozen in place (``eval()``, ``requires_grad_(False)``),
            its weights are never changed.
        prompt_features: ``w (B, style_dim)`` -> ``(source (B, D), target (B, D))`` prompt
            features ``E_T(M_s^i)``, ``E_T(M_t^i)`` of Eq. 8 (from Stage 1; a manual /
            learned-fixed scheme just repeats one row). Called under ``no_grad``.
        image_features: differentiable CLIP image encoder, images ``(B, 3, H, W)`` in [-1, 1]
            -> raw features ``(B, D)``. Its parameters receive no gradient.
        target_text_features: ``(D,)`` E_T of the raw target label, for the adaptive layer
            selection's global loss; required when ``config.auto_layer_iters > 0``.
        config: :class:`~ipl_diffusion.configs.GANStage2Config`.
        output_dir: where ``checkpoints/``, ``samples/`` and ``losses.csv`` go (None: nothing written).
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator` with
            ``config.mixed_precision`` on ``device``, else the source generator's device).
        run_config: JSON-serialisable dict stored in every checkpoint.
        device: the default accelerator's device (``benchmarks/stylegan_step.py``).

    Raises:
        UserError: an option out of range, fp16 without a GPU, adaptive layer selection
            without ``target_text_features``, or a ``device`` that is not the given accelerator's.
    """

    description = "GAN-IPL stage 2"

    def __init__(self, source_generator: StyleGAN2Generator, prompt_features: PromptFeatures, image_features: ImageFeatures,
                 target_text_features: Optional[torch.Tensor] = None, config: Optional[GANStage2Config] = None,
                 output_dir=None, accelerator=None, run_config: Optional[dict] = None, device=None):
        from ipl_diffusion.losses import adaptive_directional_loss

        config = config or GANStage2Config()
        config.validate()
        if config.auto_layer_iters > 0 and target_text_features is None:
            raise UserError("adaptive layer selection (auto_layer_iters > 0) needs target_text_features (E_T of the target label)")
        accelerator = _accelerator(accelerator, device, config, source_generator)
        self.setup(config, accelerator, output_dir, run_config or {"stage2": as_dict(config)})
        self.loss_fn = adaptive_directional_loss
        self.source = source_generator.to(self.device).eval().requires_grad_(False)
        self.generator = copy.deepcopy(self.source).train()
        self.generator_ema = copy.deepcopy(self.source).eval()
        self.prompt_features, self.image_features = prompt_features, image_features
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
            # gives every process the same scores, hence the same layers.
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

    def _loss(self):
        """This process's renders and the adaptive directional loss (Eq. 7-9); returns
        ``(loss, layers)``."""
        cfg, acc = self.config, self.accelerator
        zs = sample_z(cfg.batch_size, self.source.style_dim, cfg.mixing, self.rng, self.device, acc.num_processes, acc.process_index)
        with torch.no_grad():
            ws = [self.source.get_latent(z) for z in zs]
            src_text, tgt_text = self.prompt_features(ws[0])  # the mapper sees the first w (IPL: sample_w[0])
        layers = self.choose_layers()
        # From the shared generator, not Python's RNG: every process mixes at the same layer.
        inject = int(torch.randint(1, self.source.n_latent, (), generator=self.rng)) if len(ws) > 1 else None
        with acc.autocast():
            with torch.no_grad():
                src_img, _ = self.source(ws, input_is_latent=True, inject_index=inject)
                src_feat = self.image_features(src_img)
            tgt_img, _ = self.generator(ws, input_is_latent=True, inject_index=inject)
            tgt_feat = self.image_features(tgt_img)
        loss = cfg.clip_loss_weight * self.loss_fn(src_feat.float(), tgt_feat.float(), src_text.float(), tgt_text.float())
        return loss, layers

    def iteration(self) -> dict:
        """One iteration: ``batch_size`` latents per process, the loss ``mean_i 1 - cos(ΔI_i,
        ΔT_i)``, one averaged Adam update of the chosen layers, the EMA. Returns ``{"loss"
        (mean over processes), "grad_norm" (before clipping), "layers"}``."""
        cfg, acc = self.config, self.accelerator
        with self._iteration_noise():
            loss, layers = self._loss()
        # Checked on the mean over processes so that all raise together (one alone would leave
        # the others waiting in the gradient all-reduce).
        value = mean_over_processes({"loss": float(loss.detach())}, acc)["loss"]
        check_finite({"directional": value}, "GAN-IPL Stage 2", self.step)
        # inputs=: gradients only for G_t's chosen layers, never for CLIP.
        trainable = [p for p in self.generator.parameters() if p.requires_grad]
        acc.backward(loss, inputs=trainable)
        average_gradients(trainable, acc)
        # An infinite bound only measures: clip_grad_norm_ returns the norm either way.
        grad_norm = float(acc.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # frozen-next-time layers must have no gradient
        ema_update(self.generator_ema, self.generator, cfg.ema_decay)
        self.last_layers = list(layers)
        return {"loss": value, "grad_norm": grad_norm, "layers": list(layers)}

    # -- what the shared loop needs ------------------------------------------------------

    def checkpoint_state(self) -> dict:
        acc = self.accelerator
        return {
            "models": {"generator": acc.unwrap_model(self.generator), "generator_ema": acc.unwrap_model(self.generator_ema)},
            "optimizers": {"generator": self.optimizer.optimizer},
            "generators": {"stage2": self.rng},
        }

    def trained_model(self) -> StyleGAN2Generator:
        return self.accelerator.unwrap_model(self.generator_ema).eval()

    @torch.no_grad()
    def candidate_images(self):
        """``(G_s(w), g_ema(w))`` of ``num_candidate_images`` fixed held-out ``z`` (a seed stream
        of the run's seed that training never draws from), truncation ``sample_truncation`` with
        fixed noise as the sample grids; ``(K,3,H,W)`` float32 in ``[-1, 1]``."""
        cfg = self.config
        rng = torch.Generator().manual_seed(cfg.seed + HELDOUT_Z_OFFSET)
        z = torch.randn(cfg.num_candidate_images, self.source.style_dim, generator=rng).to(self.device)
        kwargs = dict(truncation=cfg.sample_truncation, truncation_latent=self.source.mean_latent(), randomize_noise=False)
        w = self.source.get_latent(z)
        source, _ = self.source([w], input_is_latent=True, **kwargs)
        adapted, _ = self.generator_ema([w], input_is_latent=True, **kwargs)
        return source.float(), adapted.float()

    @torch.no_grad()
    def sample_grid(self, seed: int = 0):
        """Labelled PIL grid: source samples (top row) | adapted ``g_ema`` samples (bottom row);
        ``num_sample_images`` fixed ``z`` (``seed``), truncation ``sample_truncation``, fixed noise."""
        n = self.config.num_sample_images
        z = torch.randn(n, self.source.style_dim, generator=torch.Generator().manual_seed(seed)).to(self.device)
        kwargs = dict(truncation=self.config.sample_truncation, truncation_latent=self.source.mean_latent(), randomize_noise=False)
        w = self.source.get_latent(z)
        top, _ = self.source([w], input_is_latent=True, **kwargs)
        bottom, _ = self.generator_ema([w], input_is_latent=True, **kwargs)
        return labelled_grid([top, bottom], ["source G_s(z)", f"g_ema, step {self.step}"])


def _accelerator(accelerator, device, config, source_generator):
    """The given accelerator (checked against ``device``) or a new one."""
    wanted = torch.device(device) if device is not None else None
    if accelerator is not None and wanted is not None and (
        wanted.type != accelerator.device.type or wanted.index not in (None, accelerator.device.index)
    ):
        raise UserError(f"device {str(device)!r} is not the accelerator's device {str(accelerator.device)!r}; pass one of the two")
    return accelerator or make_accelerator(config.mixed_precision, device if device is not None else source_generator.device)


# --------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------


@dataclass
class GANIPLResult:
    """What :func:`adapt_stylegan2` returns: the adapted ``g_ema``, Stage 1's prompt module
    (``LatentMapper`` or ``SharedPromptContext``), the Stage 2 history, the run options,
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
    return (gather_in_order(torch.cat(ws), order, num_images, accelerator).to(device),
            gather_in_order(torch.cat(feats), order, num_images, accelerator).to(device))


# Fresh latents Stage 1 never trains on, for its held-out prompt retrieval (batches of 32).
HELDOUT_LATENTS = 256


def run_stage1(source_generator, encoder, image_features, source, target, config: Stage1Config, seed, progress, accelerator=None,
               anchor=None):
    """Stage 1 (Eq. 6) for GAN-IPL; returns the ``PromptLearner``.

    ``config.stage1_num_images=None``: fresh ``w`` every iteration, rendered by ``G_s`` and
    encoded (the released code; the mapper then generalises to the fresh ``w`` of Stage 2).
    An int: a fixed pool of that many samples, encoded once. ``HELDOUT_LATENTS`` further
    samples from another stream of ``seed`` measure the held-out prompt retrieval. ``anchor``:
    Eq. 5's target feature ``(D,)`` in place of the label's (an image target).
    """
    from ipl_diffusion.prompt_learning import learn_prompts

    heldout = source_cache(source_generator, image_features, HELDOUT_LATENTS, seed + 20_011, accelerator=accelerator)
    common = dict(heldout=heldout, seed=seed, progress=progress, target_label_features=anchor)
    if config.stage1_num_images is None:
        @torch.no_grad()
        def sample_latents(batch, rng):
            z = torch.randn(batch, source_generator.style_dim, generator=rng)
            return source_generator.get_latent(z.to(source_generator.device))

        def generate(w):
            return source_generator([w], input_is_latent=True, randomize_noise=False)[0]

        return learn_prompts(encoder, sample_latents, source, target, config, generate=generate, **common)
    latents, features = source_cache(source_generator, image_features, config.stage1_num_images, seed, accelerator=accelerator)
    return learn_prompts(encoder, latents, source, target, config, image_features=features, **common)


# --------------------------------------------------------------------------------------
# Stage 1 + Stage 2
# --------------------------------------------------------------------------------------


def adapt_stylegan2(models, source: str, target: Optional[str], stage1: Optional[Stage1Config] = None,
                    stage2: Optional[GANStage2Config] = None, *, target_images=None, prompt_learner=None, output_dir=None,
                    resume_from_checkpoint=None, overwrite: bool = False, accelerator=None,
                    progress: bool = True) -> GANIPLResult:
    """GAN-IPL end to end: Stage 1 (Eq. 6, or ``prompt_learner`` when given), then Stage 2 (Eq. 7-9).

    Args:
        models: the source ``StyleGANIPLPipeline`` (or any object with its ``source_generator``,
            a :class:`StyleGAN2Generator` moved to the accelerator's device and frozen in place,
            and the ``transformers`` CLIP parts ``text_encoder``, ``tokenizer`` and
            ``feature_extractor``, frozen).
        source, target: domain labels (``target`` may be ``None`` with ``target_images``).
        target_images: ``(K, 3, H, W)`` in ``[-1, 1]``, style images defining the target
            (:mod:`ipl_diffusion.adaptation.image_target`: Eq. 5's anchor, Stage 2's directions
            and the layer choice's global target; ``stage1.img2img_batch`` source samples of
            another stream of the seed start the image direction).
        stage1 / stage2: :class:`~ipl_diffusion.configs.Stage1Config` /
            :class:`~ipl_diffusion.configs.GANStage2Config` (default: their defaults).
        prompt_learner: a ready Stage-1 result (``text_features(w (B, style_dim), label) ->
            (B, D)``): Stage 1 is skipped.
        output_dir: ``stage1/``, ``checkpoints/``, ``samples/`` and ``losses.csv`` go there
            (main process) and ``resume_from_checkpoint="latest"`` continues an interrupted run.
        overwrite: a fresh run replaces the earlier run's checkpoints in ``output_dir`` instead
            of being refused, once every input, label and option has passed its check.
        accelerator: an ``accelerate.Accelerator`` (default: :func:`make_accelerator`).

    Multi-process (``accelerate launch``): the Stage-1 caches are rendered in shares and
    gathered (:func:`source_cache`); Stage 1 itself runs on every process with the same seed,
    so all end with the same prompts without a broadcast (it optimises a small mapper, and
    its contrastive loss (Eq. 3-4) takes its negatives from the whole batch).

    Raises:
        UserError: bad labels or options, fp16 without a GPU; NonFiniteLossError: a NaN loss.
    """
    from transformers import CLIPImageProcessorPil

    from ipl_diffusion.clip_image import CLIPImageEncoder
    from ipl_diffusion.clip_text import CLIPPromptEncoder

    stage1, stage2 = stage1 or Stage1Config(), stage2 or GANStage2Config()
    source_generator, clip_model, tokenizer = models.source_generator, models.text_encoder, models.tokenizer
    accelerator = accelerator or make_accelerator(stage2.mixed_precision, source_generator.device)
    check_weights_dtype({"generator": source_generator, "text_encoder": clip_model}, accelerator.device)
    source_generator.to(accelerator.device)
    clip_model.to(accelerator.device)
    processor = models.feature_extractor or CLIPImageProcessorPil()
    # The encoder's image processor serves Stage 1's fresh renders; image_features, Stage 2.
    encoder = CLIPPromptEncoder(clip_model, tokenizer, image_processor=processor)
    target, label_given = image_target.resolve_label(target, target_images is not None)
    if stage2.candidate_steps and not label_given:  # before Stage 1
        raise UserError("the step choice (candidate_steps) scores along the target label's CLIP direction: "
                        "give a target label with the target_images")
    # Stage 1 puts n_ctx prompt vectors before each label: checked now, not when Stage 1 starts,
    # which is after an --overwrite has replaced the earlier checkpoints.
    n_ctx = stage1.n_ctx if prompt_learner is None else 0
    source, target = (encoder.validate_label(x, n_ctx=n_ctx) for x in (source, target))
    if output_dir is not None:  # before Stage 1 writes anything
        identity = {"source": source, "target": target, "stage1": as_dict(stage1), "stage2": as_dict(stage2)}
        checkpointing.prepare_checkpoint_folder(Path(output_dir) / "checkpoints", resume_from_checkpoint, identity,
                                                overwrite, accelerator)
    image_features = CLIPImageEncoder(clip_model, processor).encode_images
    goal, anchor, reference_w = _image_goal(source_generator, encoder, image_features, target_images, source, target,
                                            label_given, stage1, stage2, accelerator)
    learner = prompt_learner or _stage1(source_generator, encoder, image_features, source, target, stage1, stage2,
                                        output_dir, resume_from_checkpoint, progress, accelerator, anchor)
    with torch.no_grad():
        target_text = encoder.encode_text([target])[0] if goal is None else goal.style_mean
    heldout = HELDOUT_LATENTS if prompt_learner is None else 0
    run_config = {
        "backend": "stylegan2", "source": source, "target": target, "seed": stage2.seed,
        "num_processes": accelerator.num_processes,
        "stage1": {**as_dict(stage1), **stage1_store.stage1_report(learner, stage1.stage1_num_images, heldout)},
        "stage2": as_dict(stage2),
        **({"target_images": goal.report(label_given)} if goal is not None else {}),
    }
    trainer = GANIPLTrainer(
        source_generator, _prompt_features(learner, source, target, goal, reference_w),
        image_features, target_text, stage2, output_dir=output_dir, accelerator=accelerator, run_config=run_config,
    )
    if stage2.candidate_steps:  # the automatic step choice scores along the labels' direction
        labels = [encoder.label_features(x, templates=stage1.label_templates) for x in (source, target)]
        trainer.enable_step_choice(image_features, *labels)
    g_ema = trainer.train(resume_from_checkpoint=resume_from_checkpoint, progress=progress)
    return GANIPLResult(
        generator=g_ema.requires_grad_(False), mapper=getattr(learner, "prompt_module", None), history=trainer.history,
        run_config=run_config, is_main_process=accelerator.is_main_process,
    )


def _image_goal(source_generator, encoder, image_features, target_images, source, target, label_given, stage1, stage2,
                accelerator):
    """``(goal, Eq. 5 anchor, reference w)`` of an image target (:mod:`.image_target`; the
    reference is ``img2img_batch`` source samples from their own seed stream), else Nones."""
    if target_images is None:
        return None, None, None
    reference = source_cache(source_generator, image_features, stage1.img2img_batch, stage2.seed + 30_011, accelerator=accelerator)
    goal, anchor = image_target.setup(encoder, image_features, target_images, reference[1], source, target,
                                      label_given, stage1.label_templates)
    return goal, anchor, reference[0]


def _prompt_features(learner, source: str, target: str, goal=None, reference_w=None) -> PromptFeatures:
    """Stage 2's ``w -> (source, target)`` prompt features: Stage 1's (Eq. 8), or with an image
    target the ``-/+ ΔT_i^img / 2`` pairs (:mod:`.image_target`; ``ū`` over ``reference_w``)."""
    if goal is None:
        return lambda w: (learner.text_features(w, source), learner.text_features(w, target))
    with torch.no_grad():
        reference = (learner.text_features(reference_w, source), learner.text_features(reference_w, target))

    def features(w):
        return image_target.stage2_features(learner, goal, learner.text_features(w, source),
                                            learner.text_features(w, target), reference)

    return features


def _stage1(source_generator, encoder, image_features, source, target, stage1, stage2, output_dir, resume, progress, accelerator,
            anchor=None):
    """The saved Stage-1 result of a resumed run with the same options, else a new one."""
    key = {"source": source, "target": target, "seed": stage2.seed, "stage1": as_dict(stage1)}
    if anchor is not None:  # an image target's Eq. 5 anchor
        key["anchor"] = checkpointing.tensors_sha256({"anchor": anchor.float().cpu()})
    learner = stage1_store.load_stage1(output_dir, key, encoder) if resume is not None else None
    if learner is None:
        learner = run_stage1(source_generator, encoder, image_features, source, target, stage1, stage2.seed,
                             progress and accelerator.is_local_main_process, accelerator, anchor)
        if accelerator.is_main_process:
            stage1_store.save_stage1(output_dir, key, learner)
    return learner


def adapt_pipeline(pipe, target: Optional[str], source=None, *, target_images=None, prompt_learner=None, output_dir=None,
                   resume_from_checkpoint=None, overwrite: bool = False, accelerator=None, progress: bool = True,
                   **options):
    """``StyleGANIPLPipeline.adapt``: resolve the options (the configs' defaults, then the
    pipeline's recorded ``adapt_defaults``, then ``options``), run :func:`adapt_stylegan2`
    on its source generator and return ``pipe.with_adaptation(result)``.

    Raises:
        UserError: an unknown option (with the nearest names), a label the pipeline's CLIP
            does not know, or anything :func:`adapt_stylegan2` refuses.
    """
    stage1, stage2 = resolve_configs("stylegan2", pipe.config.get("adapt_defaults"), options)
    source = source or pipe.config.source_label or "Photo"
    pipe.check_known_domains(source, *([target] if target is not None else []))
    style = None if target_images is None else image_target.load_target_images(
        target_images, int(pipe.text_encoder.config.vision_config.image_size))
    with pipe.guard_output_dir(output_dir, resume_from_checkpoint, overwrite):
        result = adapt_stylegan2(
            pipe, source, target, stage1, stage2, target_images=style, prompt_learner=prompt_learner, output_dir=output_dir,
            resume_from_checkpoint=resume_from_checkpoint, overwrite=overwrite, accelerator=accelerator, progress=progress,
        )
    return pipe.with_adaptation(result, output_dir)
