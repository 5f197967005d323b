"""The options of an IPL run: one dataclass per stage, the single source of every option.

Each field has one name, a default, a one-line help and a check. The same name is used by
``pipe.adapt(**options)``, by the ``ipl adapt`` flags and by the training example (both are
generated from these fields with transformers' ``HfArgumentParser``: ``--num_inversion_steps``
or ``--num-inversion-steps``), in ``run_config.json`` and in every checkpoint.

* :class:`Stage1Config` -- prompt learning (Eq. 6), both backends;
* :class:`DiffAEStage2Config` -- Diff-IPL's generator fine-tuning (Eq. 7-9, DiffusionCLIP's
  recipe);
* :class:`GANStage2Config` -- GAN-IPL's generator fine-tuning (Eq. 7-9, StyleGAN-NADA's
  layer freezing).

Both Stage-2 configs share :class:`TrainingConfig` (optimiser, seed, checkpoints, grids).
A model folder may record recommended values (``model_index.json`` ``adapt_defaults``);
:func:`resolve_configs` layers them between the defaults here and the caller's options.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Literal, Optional

from ipl_diffusion.errors import UserError

PROMPT_SCHEMES = ("manual", "learned", "random", "adaptive")
TRAINED_SCHEMES = ("learned", "adaptive")  # the schemes Stage 1 optimises (Eq. 6); manual / random stay as built
LABEL_TEMPLATES = ("imagenet", "nada", "single")
# Stage 1's domain regulariser: Eq. 5 as published ("feature"), or the label-direction form
# ("direction", not in the paper) that benchmarks/shapes_worlds.py evaluates against it.
DOMAIN_REGULARIZERS = ("feature", "direction")
GRADIENT_MODES = ("full_chain", "per_step")
MIXED_PRECISION = ("no", "fp16", "bf16")
# StyleGAN-NADA's fixed layer sets (``--phase``); None: every StyledConv, the constant and conv1.
PHASES = (None, "texture", "shape", "no_fine", "shape_expanded", "all")


def option(default, help: str, **metadata):
    """A dataclass field with its ``--help`` line (read by ``HfArgumentParser``)."""
    return field(default=default, metadata={"help": help, **metadata})


def _check(condition: bool, name: str, rule: str, value) -> None:
    if not condition:
        raise UserError(f"{name} must be {rule}; got {value!r}")


def _positive_int(config, *names, allow_none=False, minimum=1):
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, name,
               f"a whole number >= {minimum}" + (" or None" if allow_none else ""), value)


def _finite(config, *names, positive=False, allow_none=False):
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > 0 if positive else value >= 0)
        _check(ok, name, ("a finite number > 0" if positive else "a finite number >= 0") + (" or None" if allow_none else ""), value)


def _choice(config, name, choices):
    _check(getattr(config, name) in choices, name, f"one of {choices}", getattr(config, name))


@dataclass
class Stage1Config:
    """Stage 1 (prompt learning, Eq. 6): paper / released-code defaults (300 iterations of 32,
    m = 4 prompt vectors, λ = 1, Adam lr 0.05 for the mapper). Its seed is the run's
    (``Stage2Config.seed``): one seed governs both stages."""

    _argument_group_name = "prompt learning (Stage 1)"

    scheme: Literal["adaptive", "learned", "random", "manual"] = option(
        "adaptive", "prompt scheme: adaptive = IPL's latent mapper, manual = NADA's fixed direction, "
        "learned = one shared learned prompt (CoOp), random = an untrained mapper")
    lambda_domain: float = option(1.0, "λ of Eq. 6, the weight of the domain regulariser (Eq. 5, or --domain_regularizer's)")
    stage1_iterations: int = option(300, "Stage-1 optimiser steps (0: keep the initial prompts)")
    stage1_batch_size: int = option(32, "latents per Stage-1 step (>= 2: the contrastive loss needs negatives)")
    stage1_learning_rate: Optional[float] = option(None, "Stage-1 Adam lr (None: 0.05 for the mapper, 2e-3 for a shared context)")
    n_ctx: int = option(4, "number m of prompt vectors")
    context: Optional[str] = option(None, "a phrase: sets m to its token count; the learned scheme starts from its embeddings")
    stage1_num_images: Optional[int] = option(
        None, "Stage 1's pool: GAN, a fixed pool of this many samples (None: fresh samples every step, as "
        "the released code); DiffAE, this many sampled source images when no stage1_images are given "
        "(None: the Stage-2 images)")
    label_templates: Literal["imagenet", "nada", "single"] = option(
        "imagenet", "templates averaged into a label's CLIP feature (Eq. 5, and NADA's manual direction)")
    lambda_source: float = option(0.0, "released code's source-label regulariser weight (--lambda_src)")
    domain_regularizer: Literal["feature", "direction"] = option(
        "feature", "feature = Eq. 5 as published (each target prompt towards the target label's feature); "
        "direction = not in the paper: each image's prompt direction towards the label direction, so a label's "
        "content does not enter the prompts (README: the biased Shapes world); weighted by --lambda_domain; "
        "the trained schemes (adaptive, learned) only")
    contrastive_form: Literal["infonce", "paper"] = option("infonce", "Eq. 4 as the released code (infonce) or as printed (paper)")
    logit_scale: Optional[float] = option(None, "InfoNCE temperature multiplier (None: CLIP's own logit_scale.exp())")
    heldout_every: int = option(50, "measure held-out prompt retrieval every N Stage-1 steps")
    cache_image_features: bool = option(True, "encode a fixed pool's images once (False: re-render each step)")
    encode_batch_size: int = option(32, "batch size of encoding the Stage-1 pool")
    # Image-defined targets (target_images=; ipl_diffusion.adaptation.image_target).
    img2img_batch: int = option(
        16, "target_images, StyleGAN2: source samples whose mean CLIP feature starts the image direction "
        "(NADA --img2img_batch); DiffAE uses its Stage-2 source images")

    def __post_init__(self):
        _choice(self, "scheme", PROMPT_SCHEMES)
        _choice(self, "label_templates", LABEL_TEMPLATES)
        _choice(self, "contrastive_form", ("infonce", "paper"))
        _choice(self, "domain_regularizer", DOMAIN_REGULARIZERS)
        # Only Stage 1 of a trained scheme reads the regulariser; asking for the non-default one
        # with manual / random would run the plain scheme under a name it did not get.
        _check(self.domain_regularizer == "feature" or self.scheme in TRAINED_SCHEMES, "domain_regularizer",
               f"'feature' with scheme {self.scheme!r} (it regularises Stage 1, which only {TRAINED_SCHEMES} run)",
               self.domain_regularizer)
        _finite(self, "lambda_domain", "lambda_source")
        _finite(self, "stage1_learning_rate", "logit_scale", positive=True, allow_none=True)
        _positive_int(self, "stage1_iterations", minimum=0)
        _positive_int(self, "stage1_batch_size", minimum=2)
        _positive_int(self, "n_ctx", "heldout_every", "encode_batch_size", "img2img_batch")
        _positive_int(self, "stage1_num_images", allow_none=True, minimum=2)


@dataclass
class TrainingConfig:
    """What both Stage-2 trainers share: optimiser, seed, precision, checkpoints, grids."""

    learning_rate: float = option(8e-6, "Stage-2 Adam learning rate")
    iterations: int = option(300, "Stage-2 iterations (generator updates)")
    batch_size: int = option(2, "images per Stage-2 iteration and process")
    clip_loss_weight: float = option(1.0, "weight of the adaptive directional CLIP loss (Eq. 7-9)")
    max_grad_norm: Optional[float] = option(
        1.0, "clip the gradient norm to this before each update (None: off; on the command line --max_grad_norm none)")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", "no, bf16 or fp16 (fp16 needs a GPU)")
    seed: int = option(0, "the run's one seed (Stage 1, Stage 2, sampled sources)")
    checkpointing_steps: Optional[int] = option(None, "save a resumable checkpoint every N iterations")
    checkpoints_total_limit: Optional[int] = option(2, "checkpoints kept (None: all)")
    sample_steps: Optional[int] = option(None, "write a sample grid every N iterations")
    num_sample_images: int = option(8, "images in each sample grid")
    low_memory: bool = option(False, "the low-memory preset: checkpointed gradients (DiffAE) or chunked layer "
                              "probes (StyleGAN2), and bf16 on a CUDA GPU, for options left at their defaults")
    # Automatic step choice (ipl_diffusion.adaptation.step_choice); off by default.
    candidate_steps: Optional[int] = option(
        None, "step choice: keep a candidate every N iterations and at the last, score each on held-out sources "
        "and return the chosen one (None: off, the last step)")
    keep_candidates: bool = option(False, "step choice: keep every candidate's weights in OUTPUT/candidates/step-N")
    num_candidate_images: int = option(
        16, "step choice: held-out sources scored per candidate (StyleGAN2: fixed z; the Shapes DiffAE: rendered "
        "photos; other DiffAE runs score their validation images)")
    min_preservation: float = option(0.5, "step choice: least fraction of the sources' CLIP preservation a candidate keeps")
    min_diversity: float = option(0.5, "step choice: least fraction of the sources' CLIP diversity a candidate keeps")
    direction_tolerance: float = option(
        0.05, "step choice: candidates within this fraction of the best CLIP direction reached the target; the earliest wins")

    def _apply_low_memory(self, preset: dict):
        """``low_memory``: each preset option that is still at its default takes the preset's
        value (an option set explicitly, even to its default value, is not told apart)."""
        if not self.low_memory:
            return
        import torch  # here, not at import time: `ipl --help` stays light

        if torch.cuda.is_available():
            preset = {**preset, "mixed_precision": "bf16"}
        defaults = {f.name: f.default for f in fields(self)}
        for name, value in preset.items():
            if getattr(self, name) == defaults[name]:
                setattr(self, name, value)

    def _check_training(self):
        _finite(self, "learning_rate", positive=True)
        _finite(self, "clip_loss_weight")
        _finite(self, "max_grad_norm", positive=True, allow_none=True)
        _positive_int(self, "iterations", minimum=0)
        _positive_int(self, "batch_size", "num_sample_images")
        _positive_int(self, "checkpointing_steps", "checkpoints_total_limit", "sample_steps", allow_none=True)
        _choice(self, "mixed_precision", MIXED_PRECISION)
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "a whole number", self.seed)
        self._check_step_choice()

    def _check_step_choice(self):
        _positive_int(self, "candidate_steps", allow_none=True)
        _positive_int(self, "num_candidate_images", minimum=2)
        _finite(self, "min_preservation", "min_diversity", "direction_tolerance")


@dataclass
class DiffAEStage2Config(TrainingConfig):
    """Diff-IPL's Stage 2. Defaults follow DiffusionCLIP's README example (``t0`` 400, 40
    inversion / 6 training / 40 sampling steps, lr 8e-6, CLIP weight 3) and the IPL code
    (batch 2); ``id_loss_weight`` uses DiffAE's ``z_sem`` as identity features."""

    _argument_group_name = "Diff-IPL fine-tuning (Stage 2)"

    num_images: int = option(32, "source images sampled when none are given")
    t0: int = option(400, "timestep the sources are inverted to (edit strength; DiffusionCLIP: 201-601 of 1000)")
    num_inversion_steps: int = option(40, "DDIM steps of the inversion to t0")
    num_train_steps: int = option(6, "DDIM steps decoded while training")
    num_inference_steps: int = option(40, "DDIM steps decoded for outputs")
    clip_loss_weight: float = option(3.0, "weight of the adaptive directional CLIP loss (Eq. 7-9)")
    l1_loss_weight: float = option(0.0, "weight of mean |adapted - source|")
    id_loss_weight: float = option(0.0, "weight of 1 - cos of identity features (z_sem)")
    gradient_mode: Literal["full_chain", "per_step"] = option(
        "full_chain", "back-propagate through all decoding steps, or DiffusionCLIP's update after every step")
    gradient_checkpointing: bool = option(False, "recompute UNet activations in the backward pass (less memory)")

    def __post_init__(self):
        # Checkpointed full-chain gradients: the same update as the plain full chain, with the
        # saved activations of the 6-step chain cut to 0.14x (benchmarks/stage2_memory.py).
        self._apply_low_memory({"gradient_checkpointing": True})
        self._check_training()
        _choice(self, "gradient_mode", GRADIENT_MODES)
        _finite(self, "l1_loss_weight", "id_loss_weight")
        _positive_int(self, "num_images", minimum=2)
        _positive_int(self, "t0", "num_inversion_steps", "num_train_steps", "num_inference_steps")
        _positive_int(self, "iterations")


@dataclass
class GANStage2Config(TrainingConfig):
    """GAN-IPL's Stage 2. Defaults: the IPL README / StyleGAN-NADA (300 iterations of 2, Adam
    lr ``0.002 * 4/5`` with betas ``(0, 0.99 ** (4/5))``, EMA 0.99, adaptive layer choice)."""

    _argument_group_name = "GAN-IPL fine-tuning (Stage 2)"

    learning_rate: float = option(0.002 * 4 / 5, "Stage-2 Adam lr (upstream --lr 0.002 times 4/5)")
    adam_beta2: float = option(0.99 ** (4 / 5), "Adam beta2 (beta1 is 0)")
    ema_decay: float = option(0.99, "decay of g_ema, the generator that is sampled and saved")
    mixing: float = option(0.0, "style-mixing probability")
    phase: Optional[str] = option(None, "NADA's fixed layer set when auto_layer_iters is 0: texture, shape, no_fine, shape_expanded, all")
    auto_layer_iters: int = option(1, "W+ probe steps of NADA's adaptive layer selection (0: the fixed phase set)")
    auto_layer_k: Optional[int] = option(None, "W+ rows (layers) trained per iteration (None: int(2 n_latent / 3))")
    auto_layer_batch: int = option(8, "latents of the layer-selection probe")
    auto_layer_lr: float = option(0.01, "SGD lr of the layer-selection probe")
    auto_layer_chunk: Optional[int] = option(None, "probes rendered at a time (None: all; same choice, less memory)")
    train_to_rgb: bool = option(False, "also train the ToRGB layers of the chosen rows")
    compat_layer_mapping: bool = option(False, "NADA's off-by-one row-to-layer mapping, for comparisons")
    sample_truncation: float = option(0.7, "truncation psi of the sample grids (training uses psi = 1)")

    def __post_init__(self):
        # NADA's adaptive layer choice with its W+ probes rendered two at a time: the same
        # layers are chosen, with a lower peak (benchmarks/stylegan_step.py, auto-k-chunk2).
        self._apply_low_memory({"auto_layer_chunk": 2})
        self._check_training()
        _check(self.phase in PHASES, "phase", f"one of {PHASES}", self.phase)
        for name in ("ema_decay", "mixing"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, "in [0, 1]", getattr(self, name))
        _finite(self, "auto_layer_lr", "adam_beta2", positive=True)
        _positive_int(self, "auto_layer_iters", minimum=0)
        _positive_int(self, "auto_layer_batch")
        _positive_int(self, "auto_layer_k", "auto_layer_chunk", allow_none=True)

    def validate(self):
        """Check the options again (after fields were assigned); raises :class:`UserError`."""
        self.__post_init__()


STAGE2_CONFIGS = {"diffae": DiffAEStage2Config, "stylegan2": GANStage2Config}


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _unknown(name: str, known, what: str, where: str = "") -> UserError:
    """The refusal of an option name that is not in ``known``, with the nearest names."""
    close = difflib.get_close_matches(name, sorted(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UserError(f"{what} {name!r}{where}{hint}")


def make_config(cls, *layers: dict):
    """``cls`` built from its defaults updated by each of ``layers`` in turn (later wins).

    Raises:
        UserError: a name that is no field of ``cls`` (with the nearest names), or a value
            out of range.
    """
    names = field_names(cls)
    values = {}
    for layer in layers:
        for name, value in (layer or {}).items():
            if name not in names:
                raise _unknown(name, names, f"{cls.__name__} has no option")
            values[name] = value
    return cls(**values)


def resolve_configs(backend: str, recommended: dict | None, options: dict) -> tuple[Stage1Config, TrainingConfig]:
    """``(Stage1Config, <backend>Stage2Config)`` from the defaults, then a model's recommended
    values (``adapt_defaults``), then ``options`` (the caller's, each a field of one of the two).

    Raises:
        UserError: an option that is no field of either config (with the nearest names),
            or a value out of range.
    """
    stage2_cls = STAGE2_CONFIGS[backend]
    s1, s2 = set(field_names(Stage1Config)), set(field_names(stage2_cls))
    unknown = [k for k in options if k not in s1 | s2]
    if unknown:
        other = next((b for b, cls in STAGE2_CONFIGS.items() if unknown[0] in field_names(cls)), None)
        where = f" for the {backend} backend" + (f" (it is an option of --backend {other})" if other else "")
        raise _unknown(unknown[0], s1 | s2, "unknown adapt option", where)
    unknown = [k for k in (recommended or {}) if k not in s1 | s2]
    if unknown:  # a model folder's adapt_defaults with a misspelt or other-backend name
        raise UserError(f"the model's adapt_defaults name {unknown[0]!r}, no option of the {backend} backend")
    part = lambda values, names: {k: v for k, v in values.items() if k in names}  # noqa: E731
    recommended = recommended or {}
    return (make_config(Stage1Config, part(recommended, s1), part(options, s1)),
            make_config(stage2_cls, part(recommended, s2), part(options, s2)))


def as_dict(config) -> dict:
    """The config as a JSON-able dict (``run_config.json``, checkpoints)."""
    return dataclasses.asdict(config)


@dataclass
class AdaptArguments:
    """What an adaptation run reads and writes (``ipl adapt``, ``examples/train_ipl_diffae.py``);
    the method's options are the Stage-1 / Stage-2 configs."""

    _argument_group_name = "model, data and output"

    target: Optional[str] = option(
        None, 'target domain label, e.g. "sketch" or "Wall painting" (optional with --target_images)')
    source: Optional[str] = option(None, "source domain label (default: the model's, else 'Photo')")
    model: Optional[str] = option(None, "source pipeline folder or Hub id (default: the embedded Shapes model of --backend)")
    backend: Optional[Literal["diffae", "stylegan2"]] = option(
        None, "generator family (default: read from a local --model folder, else diffae)")
    images: Optional[str] = option(None, "DiffAE: folder of source-domain images (default: sampled, or rendered for the Shapes model)")
    stage1_images: Optional[str] = option(None, "DiffAE: folder of images for Stage 1's pool (default: as --images); give thousands")
    clip_model: Optional[str] = option(
        None, "CLIP folder or Hub id (model, tokenizer and image processor; a Hub id from the cache when offline) to "
        "use instead of the pipeline's own CLIP components, and saved with the adapted pipeline; needed for a folder "
        "saved without them, e.g. a copy of a shipped Shapes folder (--clip_model ipl_diffusion/shapes_models/clip, "
        "which knows only the Shapes domains), or openai/clip-vit-base-patch32 for any label")
    output_dir: Optional[str] = option(None, "output folder (default: ./ipl-<target>)")
    overwrite: bool = option(False, "write into a --output_dir that is not empty, replacing an earlier run's result and checkpoints (without it such a folder is refused)")
    resume_from_checkpoint: Optional[str] = option(None, "'latest' or a checkpoint folder in OUTPUT/checkpoints")
    device: Optional[str] = option(None, "torch device, e.g. cuda or cpu (default: cuda if available)")
    validation_images: Optional[str] = option(
        None, "DiffAE: folder of held-out source images the run does not train on, shown in before_after.png and scored "
        "by --candidate_steps (rendered for the Shapes model; with --candidate_steps, sampled when the sources are and "
        "required with --images)")
    # Image-defined targets (ipl_diffusion.adaptation.image_target).
    target_images: Optional[str] = option(
        None, "folder of a few target-style images: their CLIP features define the target direction "
        "(NADA --style_img_dir), with or without --target")


def adapt_option_groups() -> list:
    """``(config class, --help title)`` of every adaptation option, in ``--help`` order (an
    option a later class inherits belongs to the first class that declares it)."""
    return [(Stage1Config, "prompt learning (Stage 1)"), (TrainingConfig, "fine-tuning (Stage 2, both backends)"),
            (DiffAEStage2Config, "fine-tuning (Stage 2, --backend diffae)"),
            (GANStage2Config, "fine-tuning (Stage 2, --backend stylegan2)")]
