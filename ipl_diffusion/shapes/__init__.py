"""The Shapes world: the embedded default that lets ipl-diffusion run offline.

No pretrained CLIP, DiffAE or StyleGAN2 weights can be downloaded on offline machines, so the
package ships small models trained on a synthetic world with known ground-truth factors:

* :mod:`.renderer` -- seeded batched renderer of one object (shape, colour, position, size,
  background) in one of several styles; the styles are the domains ("photo" is the source).
* :mod:`.vocab` -- captions and the byte-level BPE ``CLIPTokenizer`` built from them.
* :mod:`.oracle` -- a classifier/regressor of the factors, used only for evaluation.
* ``ipl_diffusion/shapes_models/`` -- the shipped weights (``clip/``, ``oracle/`` and the two
  source pipelines ``diffae-ipl/`` and ``stylegan2/``), located by :func:`default_model_path`.
  The CLIP is stored once, in ``clip/``: the pipelines' loaders fill it in
  (:func:`shipped_clip_components`).
"""

import difflib
import json
from pathlib import Path

from ipl_diffusion.errors import UserError, UserFileNotFoundError
from .renderer import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SOURCE_STYLE,
    STYLES,
    ShapeFactors,
    ShapesRenderer,
    render,
    sample_factors,
)

MODELS_DIR = Path(__file__).resolve().parent.parent / "shapes_models"

# backend / component -> folder inside MODELS_DIR
_MODEL_FOLDERS = {
    "diffae": "diffae-ipl",
    "stylegan2": "stylegan2",
    "clip": "clip",
    "oracle": "oracle",
}

# The components of the shipped pipelines that are the Shapes CLIP. Their folders leave them out
# (the package would otherwise hold the 7 MB CLIP three times); loading fills them in from clip/.
CLIP_COMPONENTS = ("text_encoder", "tokenizer", "feature_extractor")

# IPLPipeline.adapt defaults for the embedded Shapes DiffAE (32x32, 1.5 M-parameter UNet), sized
# so that `ipl adapt --target sketch` runs in a few minutes on 2 CPU cores, and recorded in the
# shipped folder (ipl_diffusion/shapes_models/diffae-ipl/model_index.json, a test keeps the two
# equal). Stage 1 is the paper's (300 iterations of 32) on a pool of 2048 rendered photos, so
# that the mapper generalises (held-out prompt retrieval 0.32, chance 0.03). The Stage-2
# learning rate was chosen on the NADA baseline (manual prompts, "sketch", seed 0, 32 held-out
# photos, `python benchmarks/main_job.py --backends diffae --targets sketch --extra --scheme
# manual --lr LR`), never on IPL, after the first-step fix (ΔI from x0, gradient clipping):
# the smallest lr at which NADA reaches >= 90% sketch. lr 5e-5 / 1e-4 only pale the
# background (oracle 47% / 72% sketch, solid objects by eye); 1.5e-4 draws hollow outlines
# (100%, shape kept 56%, colour kept 88%); 2e-4 turns most objects into rings (97%, 50%, 75%).
# 64 Stage-2 photos instead of 16 gave twisted, solid shapes (91%, 66%, 100%), t0 400 solid
# pinched shapes (81%), L1 weight 1.0 fewer outlines (53%).
SHAPES_ADAPT_DEFAULTS = dict(
    num_images=16,
    stage1_num_images=2048,
    stage1_iterations=300,
    stage1_batch_size=32,
    t0=500,
    num_inversion_steps=20,
    num_train_steps=4,
    num_inference_steps=20,
    learning_rate=1.5e-4,
    iterations=30,
    batch_size=4,
    l1_loss_weight=0.5,
)

# StyleGANIPLPipeline.adapt defaults for the embedded Shapes StyleGAN2 (32x32, 0.4 M-parameter
# generator), recorded in ipl_diffusion/shapes_models/stylegan2/model_index.json: IPL's recipe
# (Stage 1: 300 iterations of 32 fresh samples; Stage 2: 300 iterations, Adam betas
# (0, 0.99^0.8), EMA 0.99, NADA's adaptive layer choice) with batch 4. After 300 iterations the
# evaluated g_ema holds 0.99^300 = 5% of the initial weights (it held 55% with the old 60
# iterations). The lr was chosen on the NADA baseline ("sketch", seed 0, 32 held-out z,
# `python benchmarks/main_job.py --backends stylegan2 --targets sketch --extra --scheme manual
# --lr LR`), never on IPL, as the smallest lr at which NADA reaches >= 90% sketch: 0.0005 gives
# 75% (shape kept 97%), 0.001 100% (56%), 0.002 100% (31%). By eye even 0.001 only whitens the
# background and rim-lights the objects: this generator does not draw outlines.
SHAPES_GAN_ADAPT_DEFAULTS = dict(
    stage1_iterations=300,
    stage1_batch_size=32,
    iterations=300,
    batch_size=4,
    learning_rate=0.001,
)

_TRAINING_SCRIPTS = {
    "clip": "examples/shapes/train_clip.py",
    "oracle": "examples/shapes/train_oracle.py",
    "diffae": "examples/shapes/train_diffae.py, then examples/assemble_shapes_ipl.py",
    "stylegan2": "examples/shapes/train_stylegan2.py, then examples/assemble_shapes_ipl.py --backend stylegan2",
}


def default_model_path(backend="diffae"):
    """Folder of a shipped Shapes model, as a ``pathlib.Path``.

    Args:
        backend: ``"diffae"`` (the ``IPLPipeline`` folder, the default of ``ipl adapt``),
            ``"stylegan2"`` (the ``StyleGANIPLPipeline`` folder, the default of
            ``ipl adapt --backend stylegan2``), ``"clip"`` (the Shapes ``CLIPModel`` +
            tokenizer + image processor) or ``"oracle"``.

    Raises:
        ValueError: unknown ``backend`` (the message lists the known ones).
        FileNotFoundError: the folder is not in this installation (names the training script).
    """
    key = str(backend).strip().lower()
    if key not in _MODEL_FOLDERS:
        raise UserError(f"Unknown Shapes model {backend!r}; known: {', '.join(_MODEL_FOLDERS)}.")
    path = MODELS_DIR / _MODEL_FOLDERS[key]
    if not path.is_dir() or not any(path.glob("*.json")):
        raise UserFileNotFoundError(
            f"The shipped Shapes model {key!r} is missing: expected a saved folder at {path}. "
            f"It is produced by {_TRAINING_SCRIPTS[key]}."
        )
    return path


def is_shipped(folder) -> bool:
    """Whether ``folder`` (after resolving links) is inside :data:`MODELS_DIR`, the package's
    Shapes models."""
    return Path(folder).resolve().is_relative_to(MODELS_DIR)


def shipped_clip_components(folder, dtypes: dict) -> dict:
    """The CLIP components a shipped Shapes pipeline folder leaves out, loaded from the one copy
    in ``default_model_path("clip")``: ``{component name: object}``, ready to pass to
    ``from_pretrained``.

    ``dtypes``: ``{component name: torch.dtype or None}`` for the components the caller wants
    (leave out those it passes itself); None loads as saved. The pipeline loader resolves them
    with diffusers' dtype rules (:func:`ipl_diffusion.pipelines.loading.component_dtype`):
    diffusers casts only the components it loads itself, so the CLIP model is loaded in its
    dtype here, as it would be from the folder's own ``text_encoder/``.

    Only components that the folder's ``model_index.json`` lists with a class and whose
    sub-folder is missing are loaded, each with the transformers class named there
    (``CLIPModel``, ``CLIPTokenizer``, the image processor); the dtype applies to models only.
    Any other folder (not :func:`is_shipped`, or without a readable index) gets ``{}``, so its
    loader reports the missing sub-folders as usual.

    Raises:
        FileNotFoundError: the shipped CLIP folder is missing (:func:`default_model_path`).
    """
    folder = Path(folder)
    if not is_shipped(folder) or not (folder / "model_index.json").is_file():
        return {}
    try:
        entries = json.loads((folder / "model_index.json").read_text())
    except ValueError:  # the loader's folder check names the broken index
        return {}
    classes = {
        name: entries[name][-1]
        for name in CLIP_COMPONENTS
        if name in dtypes and isinstance(entries, dict) and isinstance(entries.get(name), list)
        and entries[name][-1] and not (folder / name).is_dir()
    }
    if not classes:
        return {}
    import transformers  # only here: the rest of ipl_diffusion.shapes does not need it

    clip = default_model_path("clip")
    loaded = {}
    for name, class_name in classes.items():
        cls = getattr(transformers, class_name)
        options = {}
        if dtypes[name] is not None and issubclass(cls, transformers.PreTrainedModel):
            options["dtype"] = dtypes[name]
        loaded[name] = cls.from_pretrained(clip, **options)
    return loaded


def source_images(num_images, seed=0, resolution=32):
    """Rendered source-domain ("photo") images for adapting a Shapes model.

    The shipped Shapes DiffAE reconstructs photos well through DDIM inversion but its
    unconditional samples (latent net + decoding from pure noise) are not clean yet, so
    adaptation of the Shapes default should start from rendered photos, as real-image
    adaptation does. Returns ``float32 (num_images, 3, resolution, resolution)`` in ``[-1, 1]``.
    """
    images, _ = ShapesRenderer(resolution).sample(int(num_images), seed=seed, style=SOURCE_STYLE)
    return images


def _domain_key(label) -> str:
    """``label`` with case, ``-``, ``_`` and spacing normalised ("Pixel_Art " -> "pixel art")."""
    return " ".join(str(label).strip().lower().replace("_", " ").replace("-", " ").split())


def meant_domain(label, known) -> str | None:
    """The domain of ``known`` that a misspelt or shortened ``label`` most likely means, or None.

    A typo ("skech", "mosiac") is close by difflib's ratio (>= 0.8, so that "noon" does not
    read as "neon" nor "stretch" as "sketch"); a word that starts another ("pixel" for "pixel
    art", "photograph" for "photo") is taken when the shared start has 4 letters or more.
    Case, ``-``, ``_`` and spacing are ignored (:func:`_domain_key`)."""
    key, names = _domain_key(label), {_domain_key(d): d for d in known}
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.8)
    if close:
        return names[close[0]]
    starts = [n for n in names if min(len(n), len(key)) >= 4 and (n.startswith(key) or key.startswith(n))]
    return names[starts[0]] if len(starts) == 1 else None


def known_domains():
    """The domain labels (style names) the Shapes CLIP was trained on, source style first."""
    return list(STYLES)


def check_domain(label):
    """Canonical Shapes domain name for ``label`` (case, ``-`` and ``_`` are ignored).

    The Shapes CLIP only knows its training styles; any other label would give a meaningless
    text direction, so it is refused here with the list of known domains.

    Raises:
        ValueError: empty label or a label the Shapes CLIP was not trained on.
    """
    if label is None or not str(label).strip():
        raise UserError(f"Empty domain label; the Shapes CLIP knows: {', '.join(known_domains())}.")
    key = _domain_key(label)
    if key not in STYLES:
        # A typo ("skech") should be answered with the word meant, before the long advice on
        # open-vocabulary CLIPs that suits a label the Shapes world never had.
        close = meant_domain(key, known_domains())
        meant = f" (did you mean {close!r}?)" if close else ""
        raise UserError(
            f"The Shapes CLIP was not trained on the domain {label!r}{meant}; known domains: "
            f"{', '.join(known_domains())}. Other labels need a real (open-vocabulary) CLIP: ipl adapt --clip_model "
            "openai/clip-vit-base-patch32 (or a local copy), a real model (ipl adapt --model <pipeline folder or Hub id "
            "whose text_encoder is a real CLIP>), or in "
            "Python IPLPipeline / StyleGANIPLPipeline.from_components(<generator>, "
            "text_encoder=\"openai/clip-vit-base-patch32\")."
        )
    return key


def shapes_source_images(pipe, num_images, seed, stage1_num_images=None, num_validation_images=8):
    """The embedded Shapes DiffAE's inputs: rendered photos (its latent net, trained for
    minutes, samples z_sem less faithfully than the renderer draws) -- the Stage-2 images, a
    large Stage-1 pool (so that the mapper generalises) and ``num_validation_images`` photos
    that neither stage sees (the before/after grid shows 8; the step choice scores them all).
    Three disjoint seed streams of the run's seed; a count left None is the folder's recorded
    adapt_defaults."""
    defaults = pipe.config.get("adapt_defaults") or {}
    size = pipe.image_size
    return {
        "images": source_images(num_images or defaults.get("num_images", 16), seed=seed, resolution=size),
        "stage1_images": source_images(
            stage1_num_images or defaults.get("stage1_num_images", 2048), seed=seed + 10_007, resolution=size
        ),
        "validation_images": source_images(num_validation_images, seed=seed + 20_011, resolution=size),
    }


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "MODELS_DIR",
    "SHAPES",
    "SOURCE_STYLE",
    "SHAPES_ADAPT_DEFAULTS",
    "SHAPES_GAN_ADAPT_DEFAULTS",
    "STYLES",
    "ShapeFactors",
    "ShapesRenderer",
    "CLIP_COMPONENTS",
    "check_domain",
    "default_model_path",
    "is_shipped",
    "known_domains",
    "render",
    "sample_factors",
    "shapes_source_images",
    "shipped_clip_components",
    "source_images",
]
