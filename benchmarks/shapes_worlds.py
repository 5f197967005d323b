#!/usr/bin/env python
"""Can the Shapes world decide IPL vs NADA? The oracle-direction gate, at matched stylisation.

The paper's claim (IPL §1, §4.4) is that NADA's one fixed text direction gives every image the
same supervision, and that the fixed direction carries content because a real CLIP's domain
label does (the web's sketches are not a uniform sample of everything). A benchmark can only
test that in a world whose CLIP has such a label. This script compares, per *world* (a Shapes
CLIP: the shipped balanced one as the control, or one trained with
``examples/shapes/train_clip.py --bias``):

* ``manual`` -- NADA's template-averaged fixed direction (``ipl_diffusion.prompt_learning``);
* ``oracle`` -- benchmark-only: ΔT_i from each image's *true* caption, "a {style} of a
  {colour} {shape}" for source and target style (averaged over the vocabulary's four full
  caption templates, as NADA averages templates); on the GAN the factors are read from
  ``G_s(w)`` by the evaluation oracle (a generated image has no renderer ground truth), on
  the DiffAE they are the rendered photos' true ones. Not a library scheme;
* ``adaptive`` -- IPL's Stage 1 mapper (Eq. 6), as ``ipl adapt`` runs it.

**The gate.** A world can decide the question only if the oracle's per-image directions beat
NADA's fixed one on factor preservation / diversity at matched target accuracy, with 95%
intervals (paired over seeds) that exclude 0. A world that fails the gate is not evidence
about IPL either way. The tables give the gate as written and, next to it, corrected for
testing 6 metrics at every ``--match_acc`` (Holm's step-down adjustment of the paired
t-tests' p-values, one family per world, learning rate and scheme); that column is given for
every scheme, as "better than NADA on some gate metric and worse on none".

**Matched stylisation.** Every run is one Stage 2 scored at several iterations
(``--milestones``; Adam at a constant lr, so the prefix of a run *is* a shorter run). Each
seed's curve (target accuracy vs shape kept, colour kept, entropies, ...) is interpolated at
``--match_acc`` target accuracies, and schemes are compared there, seed by seed.

**Backends** (``--backend``, part of the run key; each has its own default ``--milestones``,
``--learning_rates`` and ``--output_dir``):

* ``stylegan2`` (default) -- the shipped Shapes StyleGAN2, ``GANIPLTrainer`` with the shipped
  settings unless overridden; its EMA generator is scored on 32 fixed ``z`` (truncation
  0.7), the factors of ``G_s(z)`` read by the oracle (``StyleGAN2Backend``);
* ``diffae`` -- the shipped Shapes ``IPLPipeline`` adapted as ``ipl adapt`` does
  (``DiffAEStage2Trainer``, the folder's ``adapt_defaults``): rendered photos with true
  factors for training, for the oracle scheme's captions and for evaluation (held-out photos,
  DDIM-inverted once, decoded by the trained UNet at each milestone;
  ``shapes_worlds_diffae.py``).

**Diagnostics** (per world, scheme and seed; GAN: 256 held-out ``w``, their content read by
the oracle; DiffAE: the evaluation photos' ``z_sem`` and true content): Stage-1 held-out
retrieval (adaptive), the spread of the ΔT_i (mean pairwise cosine), and the content alignment
mean_i cos(ΔT_i - mean ΔT, c_i - mean c) with c_i the true content caption's features
("a {colour} {shape}"). Per world (text only): the mean cosine between the ideal directions of
the 36 contents, and NADA's cosine with each.

Outputs (``--output_dir``; ``--quick`` is redirected under ``runs/`` so it never writes
into committed results): ``runs.csv`` (one row per run x milestone, keyed by a hash of the
model files and every argument that changes a run: rows of another key are ignored, and a
resumed benchmark skips runs already there), ``world_diagnostics.csv``, ``config.json``,
``curves.csv``, ``matched.md`` / ``matched.csv`` (regenerated from runs.csv by
``--tables_only``), ``plots/`` and ``grids/``.

Usage::

    python benchmarks/shapes_worlds.py --worlds control=ipl_diffusion/shapes_models/clip biased=PATH
    python benchmarks/shapes_worlds.py --quick        # smoke test, < 5 min, writes under runs/
    python benchmarks/shapes_worlds.py --backend diffae --worlds control=ipl_diffusion/shapes_models/clip biased=PATH
    python benchmarks/shapes_worlds.py --tables_only  # tables and plots from runs.csv
"""

import argparse
import csv
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:  # run from a checkout without installing
        sys.path.insert(0, str(path))

from ipl_diffusion.configs import GANStage2Config, Stage1Config  # noqa: E402
from ipl_diffusion.grids import labelled_grid  # noqa: E402
from ipl_diffusion.shapes import (COLORS, SHAPES, SHAPES_ADAPT_DEFAULTS, SHAPES_GAN_ADAPT_DEFAULTS, STYLES,  # noqa: E402
                                  default_model_path)
from ipl_diffusion.shapes.vocab import CAPTION_TEMPLATES  # noqa: E402
from ipl_diffusion.shapes.worlds import DEFAULT_STYLE_BIAS  # noqa: E402

import shapes_collapse as sc  # noqa: E402  (the oracle metrics and the grid, shared)
from line_plots import line_plot  # noqa: E402

SCHEMES = ("manual", "oracle", "adaptive", "direction", "learned", "random")
SCHEME_NAMES = {"manual": "manual (NADA)", "oracle": "oracle (true captions)", "adaptive": "adaptive (IPL)",
                "direction": "adaptive, direction regulariser", "learned": "learned (one learned prompt)",
                "random": "random prompts"}
# "direction" (not in the paper, the remedy of issue 18 item 5): IPL's latent mapper with Stage 1's
# domain regulariser on each prompt's direction (Stage1Config.domain_regularizer="direction")
# instead of Eq. 5. Run only when asked for: the default --schemes are the paper's and the oracle.
DEFAULT_SCHEMES = ("manual", "oracle", "adaptive", "learned", "random")
# "adaptive@LAMBDA" is IPL with Eq. 6's weight lambda of the domain loss (Eq. 5) instead of
# --lambda_domain (the lambda sweep of the paper's Fig. 7), compared with NADA like any scheme.
SWEEPABLE = ("adaptive", "direction")
# "content@ALPHA" (benchmark-only, the detection control): NADA's direction with the world's
# biased content for the target (DEFAULT_STYLE_BIAS, e.g. "red circle" for sketch) planted in
# it at ALPHA times the direction's own length. It is what a label that carries content does
# to NADA, at a known strength: if the benchmark cannot tell it from NADA, it cannot see drift.
PLANTED = "content"


def split_scheme(name):
    """``"adaptive@0.5"`` -> ``("adaptive", 0.5)``; a plain scheme name -> ``(name, None)``."""
    base, sep, value = name.partition("@")
    return base, (float(value) if sep else None)


def check_scheme(name):
    """argparse type of ``--schemes``: a scheme of SCHEMES, ``adaptive@LAMBDA`` / ``direction@LAMBDA``
    (LAMBDA >= 0) or ``content@ALPHA``."""
    base, sep, value = name.partition("@")
    if base not in SCHEMES and base != PLANTED:
        raise argparse.ArgumentTypeError(f"unknown scheme {name!r}; known: {', '.join(SCHEMES)}, adaptive@LAMBDA, direction@LAMBDA, content@ALPHA")
    if base == PLANTED and not sep:
        raise argparse.ArgumentTypeError(f"{name!r}: the planted-content control needs its strength, content@ALPHA")
    if sep:
        if base not in SWEEPABLE + (PLANTED,):
            raise argparse.ArgumentTypeError(f"{name!r}: only adaptive@LAMBDA, direction@LAMBDA (Eq. 6's weight) and content@ALPHA take a number")
        try:
            ok = float(value) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"{name!r}: {'ALPHA' if base == PLANTED else 'LAMBDA'} must be a number >= 0")
    return name


def scheme_label(name):
    """Table label of a scheme, with its lambda for a sweep point."""
    base, lam = split_scheme(name)
    if base == PLANTED:
        return f"NADA + planted content, α = {lam:g}"
    return SCHEME_NAMES[base] + ("" if lam is None else f", λ = {lam:g}")


def schemes_in(names):
    """The distinct schemes among ``names`` in table order (SCHEMES, then lambda)."""
    order = {s: i for i, s in enumerate(SCHEMES + (PLANTED,))}
    def key(name):
        base, value = split_scheme(name)
        return order[base], -1.0 if value is None else value

    return sorted(set(names), key=key)


# What the comparison reads at matched target accuracy: (key, label, which way is better).
CURVE_METRICS = (
    ("shape_acc", "shape kept", 1),
    ("color_acc", "colour kept", 1),
    ("shape_prob_kept", "p(shape kept)", 1),
    ("color_prob_kept", "p(colour kept)", 1),
    ("shape_entropy", "shape entropy", 1),
    ("color_entropy", "colour entropy", 1),
    ("feature_spread", "feature spread", 1),
    ("drift_to_bias_shape", "→ biased shape (lower is better)", -1),
    ("drift_to_bias_color", "→ biased colour (lower is better)", -1),
)
METRIC_LABELS = {key: label for key, label, _ in CURVE_METRICS}
GATE_METRICS = ("shape_acc", "color_acc", "shape_prob_kept", "color_prob_kept", "shape_entropy", "color_entropy")
MIN_GATE_SEEDS = 5
# Directed drift (reported, not part of the gate): the share of images that did not show the
# biased world's content for the target (DEFAULT_STYLE_BIAS) and now do. A label that carries
# content should pull NADA's images there.
DRIFT_METRICS = (("drift_to_bias_shape", "→ biased shape"), ("drift_to_bias_color", "→ biased colour"))
FULL_CAPTIONS = CAPTION_TEMPLATES[("style", "color", "shape")]
# Per backend, what --milestones / --learning_rates / --output_dir default to (the shipped
# Stage 2: GAN 0.001, scored up to 250 of its 300 iterations; DiffAE 1.5e-4 for 30
# iterations, scored every 5), what --quick sets, and the options that join the run key
# (none for the GAN, so that the keys of its runs made before the DiffAE backend stay valid).
BACKEND_DEFAULTS = {
    "stylegan2": dict(milestones=[10, 20, 30, 45, 60, 80, 100, 130, 160, 200, 250],
                      learning_rates=[SHAPES_GAN_ADAPT_DEFAULTS["learning_rate"]],
                      output_dir="benchmarks/results/shapes_worlds", quick=dict(milestones=[2, 4]), key_options=()),
    "diffae": dict(milestones=list(range(5, SHAPES_ADAPT_DEFAULTS["iterations"] + 1, 5)),
                   learning_rates=[SHAPES_ADAPT_DEFAULTS["learning_rate"]],
                   output_dir="benchmarks/results/shapes_worlds_diffae",
                   quick=dict(milestones=[1, 2], train_images=4, stage1_images=64),
                   key_options=("backend", "train_images", "stage1_images")),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="stylegan2", choices=sorted(BACKEND_DEFAULTS),
                   help="the generator adapted: the shipped Shapes StyleGAN2 or DiffAE (IPLPipeline)")
    p.add_argument("--worlds", nargs="+", default=None,
                   help="NAME=CLIP_FOLDER pairs (default: control = the shipped Shapes CLIP)")
    p.add_argument("--gan_model", default=None, help="stylegan2: source StyleGANIPLPipeline folder (default: the shipped Shapes GAN)")
    p.add_argument("--diffae_model", default=None, help="diffae: source IPLPipeline folder (default: the shipped Shapes DiffAE)")
    p.add_argument("--oracle", default=None, help="evaluation oracle folder (default: the shipped one); the same in every world")
    p.add_argument("--output_dir", default=None, help="default: benchmarks/results/shapes_worlds (stylegan2), "
                   "benchmarks/results/shapes_worlds_diffae (diffae)")
    p.add_argument("--target", default="sketch", choices=STYLES[1:], help="the target style (the source is photo)")
    p.add_argument("--schemes", nargs="+", default=list(DEFAULT_SCHEMES), type=check_scheme, metavar="SCHEME",
                   help=f"among {', '.join(SCHEMES)} (default: all but direction); adaptive@LAMBDA runs IPL with Eq. 6's weight "
                   "LAMBDA on Eq. 5's domain loss (Fig. 7's sweep); direction (not in the paper) is IPL with Stage 1's domain "
                   "regulariser on each prompt direction, direction@LAMBDA its weight; content@ALPHA is the detection control, NADA with the target's biased content planted at ALPHA")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--learning_rates", nargs="+", type=float, default=None,
                   help="Stage 2 lr (default: the shipped one, stylegan2 0.001, diffae 1.5e-4)")
    p.add_argument("--milestones", nargs="+", type=int, default=None,
                   help="iterations at which the adapted generator is scored (the last is the run's length; "
                   "default stylegan2 10 20 ... 250, diffae 5 10 ... 30)")
    p.add_argument("--batch_size", type=int, default=4, help="Stage 2 batch (shipped 4)")
    p.add_argument("--stage1_iterations", type=int, default=300, help="adaptive Stage 1 iterations (shipped 300)")
    p.add_argument("--stage1_batch_size", type=int, default=32)
    p.add_argument("--lambda_domain", type=float, default=1.0)
    p.add_argument("--train_images", type=int, default=None, help="diffae: Stage-2 photos per seed (default: the shipped 16)")
    p.add_argument("--stage1_images", type=int, default=None, help="diffae: Stage-1 pool of photos per seed (default: the shipped 2048)")
    p.add_argument("--eval_images", type=int, default=32)
    p.add_argument("--diag_latents", type=int, default=256, help="stylegan2: held-out w of the direction diagnostics")
    p.add_argument("--truncation", type=float, default=0.7, help="stylegan2: truncation of the evaluated images")
    p.add_argument("--match_acc", nargs="+", type=float, default=[0.5, 0.8])
    p.add_argument("--images_dir", default=str(REPO / "runs" / "shapes_worlds_images"),
                   help="every milestone's evaluated images (uint8 safetensors; not committed), for re-scoring with another oracle")
    p.add_argument("--rescore_from", default=None,
                   help="an earlier output folder: score its saved images (--images_dir) with --oracle instead of "
                   "adapting again (same runs, another evaluation oracle; its rows get their own key)")
    p.add_argument("--tables_only", action="store_true", help="regenerate tables / plots from runs.csv, run nothing")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, tiny budgets, output under runs/")
    args = p.parse_args(argv)
    defaults = BACKEND_DEFAULTS[args.backend]
    for name in ("milestones", "learning_rates", "output_dir"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.worlds is None:
        args.worlds = [f"control={default_model_path('clip')}"]
    if args.quick:
        apply_quick(args, defaults)
    args.milestones = sorted(set(args.milestones))
    args.match_acc = matched_accuracies(p, args.match_acc)
    return args


def matched_accuracies(parser, values):
    """``--match_acc`` without repeats (a repeated level would enlarge the Holm family with
    copies of the same tests); ``parser.error`` for a level outside (0, 1]."""
    bad = [v for v in values if not 0 < v <= 1]
    if bad:
        parser.error(f"--match_acc takes target accuracies in (0, 1], got {', '.join(f'{v:g}' for v in bad)}")
    return list(dict.fromkeys(values))


def apply_quick(args, defaults):
    """--quick: one seed, tiny budgets (diffae: 4 photos, a pool of 64), output under runs/."""
    args.seeds = args.seeds[:1]
    args.stage1_iterations, args.eval_images, args.diag_latents = 5, 8, 16
    for name, value in defaults["quick"].items():
        setattr(args, name, value)
    # --quick never writes into the committed results folder: there it goes under runs/.
    results = (REPO / "benchmarks" / "results").resolve()
    if Path(args.output_dir).resolve().is_relative_to(results):
        args.output_dir = str(REPO / "runs" / f"{Path(defaults['output_dir']).name}_quick")
    args.images_dir = str(Path(args.rescore_from or args.output_dir) / "images")  # re-scoring reads the old run's


def parse_worlds(items):
    worlds = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--worlds takes NAME=CLIP_FOLDER, got {item!r}")
        if not (Path(path) / "model.safetensors").is_file():
            raise FileNotFoundError(f"world {name!r}: no CLIP model.safetensors in {path}")
        worlds[name] = Path(path)
    return worlds


# ------------------------------------------------------------------------------ provenance


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(folder):
    """sha256 over every weight / config file of a model folder (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json") and f.name != "training_record.json":
            h.update(str(f.relative_to(folder)).encode())
            h.update(file_digest(f).encode())
    return h.hexdigest()


def run_settings_key(args, digests):
    """Hash of every option that changes one run's numbers, and of the model files it used.

    ``--seeds``, ``--worlds`` names, ``--schemes``, ``--match_acc`` and the output folder only
    choose *which* runs / tables are made, so they are not part of it; the world's CLIP file is
    (``digests``), per run. A backend's ``key_options`` join it (``BACKEND_DEFAULTS``).
    """
    settings = {k: getattr(args, k) for k in (
        "target", "milestones", "batch_size", "stage1_iterations", "stage1_batch_size", "lambda_domain",
        "eval_images", "diag_latents", "truncation") + BACKEND_DEFAULTS[args.backend]["key_options"]}
    blob = json.dumps({"settings": settings, "models": digests}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ the oracle scheme


class OracleCaptionPrompts:
    """Benchmark-only prompt scheme: each image's *true* caption features.

    ``text_features(latents (B, ...), label, content=None) -> (B, D)``: the mean of the unit
    CLIP text features of the full captions "a {label} of a {colour} {shape}" (the
    vocabulary's templates), the same form as NADA's template-averaged label features, for
    ``content = (shape (B,), colour (B,))`` indices; without it, ``read_content(latents)``
    gives them (the GAN: shape and colour of ``G_s(w)`` read by the evaluation oracle). Features
    of the 6 x 6 contents are computed once per label.
    """

    def __init__(self, encoder, read_content=None):
        self.encoder, self.read_content = encoder, read_content
        self._table = {}

    def caption_table(self, label):
        """``(len(SHAPES), len(COLORS), D)`` features of every content in style ``label``."""
        if label not in self._table:
            rows = []
            with torch.no_grad():
                for shape in SHAPES:
                    for color in COLORS:
                        texts = [t.format(style=label, color=color, shape=shape) for t in FULL_CAPTIONS]
                        rows.append(F.normalize(self.encoder.encode_text(texts).float(), dim=-1).mean(0))
            self._table[label] = torch.stack(rows).view(len(SHAPES), len(COLORS), -1)
        return self._table[label]

    @torch.no_grad()
    def text_features(self, latents, label, content=None):
        shape, color = content if content is not None else self.read_content(latents)
        return self.caption_table(label)[shape, color].to(latents.device)


def biased_content_direction(encoder, target):
    """Unit ``(D,)`` direction of the world's biased content for ``target`` (DEFAULT_STYLE_BIAS):
    mean feature of the content captions that show it, minus the mean over all 36 contents."""
    bias = DEFAULT_STYLE_BIAS.get(target)
    if not bias:
        raise ValueError(f"no biased content is defined for {target!r}; content@ALPHA needs one of {', '.join(DEFAULT_STYLE_BIAS)}")
    grid = torch.cartesian_prod(torch.arange(len(SHAPES)), torch.arange(len(COLORS)))
    feats = content_features(encoder, grid[:, 0], grid[:, 1])
    match = torch.ones(len(grid), dtype=torch.bool)
    for factor, names, column in (("shape", SHAPES, 0), ("color", COLORS, 1)):
        if factor in bias:
            match &= grid[:, column] == names.index(bias[factor])
    return F.normalize(feats[match].mean(0) - feats.mean(0), dim=-1)


class PlantedContent:
    """NADA's learner with ``alpha`` x |ΔT| of ``direction`` added to the target label's unit
    feature, so ΔT = Norm(tgt) - Norm(src) gains that content (before the trainer's renormalising)."""

    def __init__(self, manual, direction, alpha, target):
        self.manual, self.direction, self.alpha, self.target = manual, direction, float(alpha), target
        self.heldout_retrieval = None

    def text_features(self, latents, label):
        feats = F.normalize(self.manual.text_features(latents, label).float(), dim=-1)
        if label != self.target:
            return feats
        source = F.normalize(self.manual.text_features(latents, "photo").float(), dim=-1)
        return planted_target(feats, source, self.direction, self.alpha)


def planted_target(target, source, direction, alpha):
    """Unit target features ``(B, D)`` (or ``(D,)``) with ``alpha`` x |target - source| of the
    unit content ``direction`` added: what ``content@ALPHA`` gives NADA's direction."""
    length = (target - source).norm(dim=-1, keepdim=True)
    return target + alpha * length * direction.to(target)


def content_features(encoder, shape, color):
    """``(B, D)`` unit features of the content captions "a {colour} {shape}" (c_i of the diagnostics)."""
    texts = [f"a {COLORS[int(c)]} {SHAPES[int(s)]}" for s, c in zip(shape, color)]
    with torch.no_grad():
        return F.normalize(encoder.encode_text(texts).float(), dim=-1)


def direction_diagnostics(src, tgt, content):
    """Spread and content alignment of per-image directions ΔT_i = Norm(tgt_i) - Norm(src_i).

    Returns ``dict(dt_mean_pairwise_cos, dt_residual_norm, content_alignment)``: the mean
    pairwise cosine of the ΔT_i (1 for one fixed direction), the mean norm of
    ``ΔT_i - mean ΔT`` relative to ``|mean ΔT|``, and mean_i cos(ΔT_i - mean ΔT, c_i - mean c)
    (0 when the directions do not depend on the image's content; NaN for a fixed direction).
    """
    dt = F.normalize(tgt.float(), dim=-1) - F.normalize(src.float(), dim=-1)
    unit = F.normalize(dt, dim=-1)
    n = len(dt)
    cos = unit @ unit.T
    pairwise = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
    residual = dt - dt.mean(0, keepdim=True)
    residual_norm = residual.norm(dim=-1)
    rel = float(residual_norm.mean() / dt.mean(0).norm().clamp_min(1e-12))
    if float(residual_norm.max()) < 1e-6:
        alignment = float("nan")
    else:
        c = content - content.mean(0, keepdim=True)
        alignment = float(F.cosine_similarity(residual, c, dim=-1).mean())
    return dict(dt_mean_pairwise_cos=pairwise, dt_residual_norm=rel, content_alignment=alignment)


@torch.no_grad()
def world_diagnostics(encoder, target, source="photo"):
    """Text-only checks of a world's CLIP: how alike the 36 ideal directions are, and how close
    NADA's template-averaged direction is to each (0.995 / >= 0.97 in the balanced world).
    """
    table = OracleCaptionPrompts(encoder)
    ideal = (table.caption_table(target) - table.caption_table(source)).flatten(0, 1)
    unit = F.normalize(ideal, dim=-1)
    n = len(unit)
    cos = unit @ unit.T
    nada = F.normalize(encoder.label_features(target) - encoder.label_features(source), dim=-1).to(unit)
    to_nada = unit @ nada
    # The content a direction carries: its cosine with each shape's / colour's content
    # direction ("a {shape}" minus the mean over shapes), max over values.
    shape_feats = F.normalize(encoder.encode_text([f"a {s}" for s in SHAPES]).float(), dim=-1)
    color_feats = F.normalize(encoder.encode_text([f"a {c} object" for c in COLORS]).float(), dim=-1)
    shape_dirs = F.normalize(shape_feats - shape_feats.mean(0), dim=-1)
    color_dirs = F.normalize(color_feats - color_feats.mean(0), dim=-1)
    nada_shape, nada_color = shape_dirs @ nada, color_dirs @ nada
    return dict(
        ideal_mean_pairwise_cos=float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))),
        nada_ideal_cos_mean=float(to_nada.mean()),
        nada_ideal_cos_min=float(to_nada.min()),
        nada_top_shape=SHAPES[int(nada_shape.argmax())],
        nada_top_shape_cos=float(nada_shape.max()),
        nada_top_color=COLORS[int(nada_color.argmax())],
        nada_top_color_cos=float(nada_color.max()),
    )


def score(oracle, images, ev, target):
    """The shapes_collapse oracle metrics plus the directed drift towards the biased content."""
    metrics = sc.evaluate_images(oracle, images, ev["factors"], STYLES.index(target), images.shape[-1], ev["spread"])
    pred = oracle.predict(images)
    # The oracle's probability of each source image's own shape / colour: "kept" without the
    # argmax, so a partial drift (a square rounding off, blue turning purple) counts before
    # it flips the label; the accuracies above only see the flips.
    for factor in ("shape", "color"):
        probs, source = pred[f"{factor}_probs"].float().cpu(), getattr(ev["factors"], factor).cpu()
        metrics[f"{factor}_prob_kept"] = float(probs.gather(1, source.view(-1, 1)).mean())
    bias = DEFAULT_STYLE_BIAS.get(target, {})
    for factor, names in (("shape", SHAPES), ("color", COLORS)):
        key = f"drift_to_bias_{factor}"
        if factor not in bias:
            metrics[key] = float("nan")
            continue
        value = names.index(bias[factor])
        before = getattr(ev["factors"], factor) != value
        metrics[key] = float((pred[factor][before] == value).float().mean()) if before.any() else float("nan")
    return metrics


# ------------------------------------------------------------------------------ one run


def load_world_clip(path, device):
    from transformers import CLIPModel, CLIPTokenizer

    from ipl_diffusion.clip_image import CLIPImageEncoder
    from ipl_diffusion.clip_text import CLIPPromptEncoder

    model = CLIPModel.from_pretrained(str(path)).to(device).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(str(path))
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(str(path))
    encoder = CLIPPromptEncoder(model, tokenizer, image_processor=processor)
    return encoder, CLIPImageEncoder(model, processor).encode_images


@torch.no_grad()
def render(generator, w, mean_w, truncation):
    images, _ = generator([w], input_is_latent=True, truncation=truncation, truncation_latent=mean_w, randomize_noise=False)
    return images.float().clamp(-1, 1).cpu()


class StyleGAN2Backend:
    """The GAN (``--backend stylegan2``): the Shapes ``StyleGANIPLPipeline`` (``--gan_model``)
    adapted by ``GANIPLTrainer``, its EMA generator scored on ``G_s`` of fixed ``z``.

    What a backend supplies to the shared benchmark (``DiffAEBackend`` the same): the loaded
    ``pipe`` / ``path``, ``model_digests``, ``content_reader`` (the oracle scheme's content of a
    training latent, None when it is given), ``evaluation_set``, ``diagnostics_set``, the
    grid / table labels, ``stage1``, ``stage2_prompts``, ``trainer`` and ``render``.
    """

    name = "stylegan2"

    def __init__(self, args, device):
        self.pipe, self.path = sc.load_source_pipeline("stylegan2", args.gan_model, device)
        self.generator = self.pipe.source_generator

    def model_digests(self, digest):
        """``{name: digest}`` of the model files that define a run (``digest``: a folder's sha256)."""
        return {"gan": digest(Path(self.path) / "source_generator")}

    def content_reader(self, oracle):
        """``w -> (shape, colour)`` of ``G_s(w)`` (fixed noise) read by ``oracle``: a generated
        image has no renderer ground truth."""
        @torch.no_grad()
        def read(w):
            images, _ = self.generator([w], input_is_latent=True, randomize_noise=False)
            pred = oracle.predict(images)
            return pred["shape"].cpu(), pred["color"].cpu()
        return read

    def evaluation_set(self, oracle, args):
        """Source images ``ev_x`` and the ``ev`` dict runs are scored against (``factors``, ``spread``)."""
        from types import SimpleNamespace

        # Fixed z of a stream no run trains on, and the source generator's images of them, read
        # by the oracle (a generated image has no renderer ground truth).
        z = torch.randn(args.eval_images, self.generator.style_dim, generator=torch.Generator().manual_seed(31337))
        mean_w = self.pipe.mean_latent()
        with torch.no_grad():
            ev_w = self.generator.get_latent(z)
        ev_x = render(self.generator, ev_w, mean_w, args.truncation)
        read = oracle.predict(ev_x)
        factors = SimpleNamespace(shape=read["shape"], color=read["color"], position=read["position"], size=read["size"])
        return ev_x, dict(w=ev_w, mean_w=mean_w, factors=factors, spread=sc.mean_pairwise_distance(read["features"]))

    def diagnostics_set(self, oracle, args, ev):
        """``--diag_latents`` untruncated w (what Stage 1 / 2 train on) of another stream and their content."""
        zd = torch.randn(args.diag_latents, self.generator.style_dim, generator=torch.Generator().manual_seed(4242))
        with torch.no_grad():
            w = self.generator.get_latent(zd)
        return dict(w=w, content=self.content_reader(oracle)(w))

    def source_label(self, args):
        return "source G_s(z)", f"source G_s(z) (truncation {args.truncation})"

    def diagnostics_label(self, args):
        return f"{args.diag_latents} held-out w"

    def stage1(self, encoder, image_features, options, seed, args):
        from ipl_diffusion.adaptation import stylegan2 as gan_ipl

        return gan_ipl.run_stage1(self.generator, encoder, image_features, "photo", args.target, options, seed, False)

    def stage2_prompts(self, learner, scheme, seed, args):
        """What ``GANIPLTrainer`` reads the directions from: ``w -> (source (B, D), target (B, D))``."""
        return lambda w: (learner.text_features(w, "photo"), learner.text_features(w, args.target))

    def trainer(self, prompts, encoder, image_features, seed, lr, args):
        from ipl_diffusion.adaptation import stylegan2 as gan_ipl

        config = GANStage2Config(iterations=args.milestones[-1], batch_size=args.batch_size, learning_rate=lr, seed=seed)
        with torch.no_grad():
            target_text = encoder.encode_text([args.target])[0]
        return gan_ipl.GANIPLTrainer(self.generator, prompts, image_features, target_text, config)

    def render(self, trainer, ev, args):
        """The EMA generator's images of the evaluation set now."""
        return render(trainer.generator_ema, ev["w"], ev["mean_w"], args.truncation)


def make_backend(args, device):
    """The ``--backend``'s loaded source model (``StyleGAN2Backend`` / ``shapes_worlds_diffae.DiffAEBackend``)."""
    if args.backend == "diffae":
        from shapes_worlds_diffae import DiffAEBackend

        return DiffAEBackend(args, device)
    return StyleGAN2Backend(args, device)


def stage1_run(backend, encoder, image_features, oracle, scheme, seed, args, diag):
    """One run's prompts (the oracle's true captions, or ``backend.stage1``) and their diagnostics
    on the held-out ``diag`` set: ``(learner, info)``, info being iteration 0's row values."""
    t0 = time.time()
    if scheme == "oracle":
        learner = OracleCaptionPrompts(encoder, backend.content_reader(oracle))
        src_d = learner.text_features(diag["w"], "photo", diag["content"])
        tgt_d = learner.text_features(diag["w"], args.target, diag["content"])
        retrieval = None
    else:
        base, lam = split_scheme(scheme)
        options = Stage1Config(scheme={PLANTED: "manual", "direction": "adaptive"}.get(base, base),
                               domain_regularizer="direction" if base == "direction" else "feature",
                               lambda_domain=args.lambda_domain if lam is None or base == PLANTED else lam,
                               stage1_iterations=args.stage1_iterations,
                               stage1_batch_size=args.stage1_batch_size, n_ctx=4, label_templates="imagenet")
        learner = backend.stage1(encoder, image_features, options, seed, args)
        if base == PLANTED:
            learner = PlantedContent(learner, biased_content_direction(encoder, args.target), lam, args.target)
        with torch.no_grad():
            src_d, tgt_d = learner.text_features(diag["w"], "photo"), learner.text_features(diag["w"], args.target)
        retrieval = learner.heldout_retrieval
    info = dict(stage1_heldout_retrieval=float(retrieval) if retrieval is not None else float("nan"))
    info.update(direction_diagnostics(src_d, tgt_d, diag["c"]))
    info["stage1_seconds"] = time.time() - t0
    return learner, info


def run_one(backend, world_state, oracle, scheme, seed, lr, args, ev):
    """One Stage 1 + Stage 2 run; yields ``(iteration, metrics, images)`` at each milestone
    after the run-level diagnostics (``iteration`` 0, images None)."""
    encoder, image_features, diag = world_state
    learner, info = stage1_run(backend, encoder, image_features, oracle, scheme, seed, args, diag)
    yield 0, info, None

    prompts = backend.stage2_prompts(learner, scheme, seed, args)
    trainer = backend.trainer(prompts, encoder, image_features, seed, lr, args)
    t1 = time.time()
    while trainer.step < args.milestones[-1]:
        trainer.train_step()
        if trainer.step in args.milestones:
            images = backend.render(trainer, ev, args)
            metrics = score(oracle, images, ev, args.target)
            metrics["stage2_seconds"] = time.time() - t1
            yield trainer.step, metrics, images


# ------------------------------------------------------------------------------ analysis


def interpolate_at(points, acc):
    """Value of a metric at target accuracy ``acc`` along one run's curve.

    ``points``: ``[(iteration, target_acc, value)]`` in iteration order, with the source
    (iteration 0, accuracy 0, value at the source) first. The first segment whose accuracy
    crosses ``acc`` is interpolated linearly; None when the run never reaches ``acc``.
    """
    for (_, a0, v0), (_, a1, v1) in zip(points, points[1:]):
        if a0 < acc <= a1:
            return v0 + (v1 - v0) * (acc - a0) / (a1 - a0)
        if a0 == acc:
            return v0
    return None


def summarise(values):
    values = [v for v in values if v is not None and v == v]
    if not values:
        return float("nan"), float("nan"), 0
    mean, half = sc.summarise(values)
    return mean, half, len(values)


def write_csv(path, records):
    """Write ``records`` (dicts with the same keys) to ``path`` as CSV with a header."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)


def matched_values(rows, args, source_metrics):
    """``{(world, scheme, lr, acc): {metric: {seed: value}}}``: each run's curve read at each
    ``--match_acc`` (None where the run never reaches it or predates the metric)."""
    curves = {}
    for r in rows:
        if int(r["iteration"]) == 0:
            continue
        curves.setdefault((r["world"], r["scheme"], float(r["lr"]), int(r["seed"])), []).append(r)
    matched = {}
    for (world, scheme, lr, seed), members in curves.items():
        members.sort(key=lambda r: int(r["iteration"]))
        for acc in args.match_acc:
            for key, _, _ in CURVE_METRICS:
                if any(m.get(key) in (None, "") for m in members):  # rows from before the metric existed
                    value = None
                else:
                    pts = [(0, source_metrics["target_acc"], source_metrics[key])]
                    pts += [(int(m["iteration"]), float(m["target_acc"]), float(m[key])) for m in members]
                    value = interpolate_at(pts, acc)
                matched.setdefault((world, scheme, lr, acc), {}).setdefault(key, {})[seed] = value
    return matched


def matched_table(matched, worlds, lrs, args):
    """Markdown lines and ``matched.csv`` records of the values at matched target accuracy."""
    header = "| world | lr | target acc | scheme | seeds reaching | " + " | ".join(label for _, label, _ in CURVE_METRICS) + " |"
    lines = ["### Values at matched target accuracy (mean ± 95% t-interval over seeds)", "", header, "|" + "---|" * (5 + len(CURVE_METRICS))]
    table = []
    for world in worlds:
        for lr in lrs:
            for acc in args.match_acc:
                for scheme in schemes_in(k[1] for k in matched):
                    per = matched.get((world, scheme, lr, acc))
                    if not per:
                        continue
                    cells, record = [], dict(world=world, lr=lr, match_acc=acc, scheme=scheme)
                    reached = 0
                    for key, _, _ in CURVE_METRICS:
                        mean, half, n = summarise(list(per[key].values()))
                        reached = max(reached, n)
                        record[key], record[key + "_ci95"] = mean, half
                        cells.append("–" if n == 0 else f"{mean:.3f} ± {half:.3f}")
                    record["seeds_reaching"] = f"{reached}/{len(per[CURVE_METRICS[0][0]])}"
                    table.append(record)
                    lines.append(f"| {world} | {lr:g} | {acc:g} | {scheme_label(scheme)} | {record['seeds_reaching']} | " + " | ".join(cells) + " |")
    return lines, table


def compare_to_manual(base, other, record):
    """Fill ``record`` with the seed-paired differences other - manual per metric: mean, 95%
    half-width, seed count and the paired t-test's two-sided p (NaN under 2 pairs). Returns
    the table cells and, per gate metric with >= 2 pairs, whether its interval is above 0."""
    cells, passes = [], []
    for key, _, _ in CURVE_METRICS:
        diffs = [other[key][s] - base[key][s] for s in base[key]
                 if s in other[key] and base[key][s] is not None and other[key][s] is not None]
        mean, half, n = summarise(diffs)
        record[key], record[key + "_ci95"], record[key + "_n"] = mean, half, n
        record[key + "_p"] = paired_p(diffs)
        if n >= 2 and key in GATE_METRICS:
            passes.append(mean - half > 0)
        cells.append("–" if n == 0 else f"{mean:+.3f} ± {half:.3f} (n={n})")
    return cells, passes


def paired_p(diffs):
    """Two-sided p of the paired t-test that the mean of ``diffs`` is 0; NaN under 2 values,
    0 or 1 where every difference is the same (no spread to test against)."""
    n = len(diffs)
    if n < 2:
        return float("nan")
    mean = sum(diffs) / n
    sd = (sum((d - mean) ** 2 for d in diffs) / (n - 1)) ** 0.5
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return sc.t_two_sided_p(mean / (sd / n ** 0.5), n - 1)


def gate_verdict(record, passes):
    """PASS, fail or undecided for one comparison's paired differences."""
    # The gate (oracle only): better on at least one preservation / diversity
    # metric with the interval above 0, and significantly worse on none.
    worse = any(record.get(k + "_n", 0) >= 2 and record[k] + record[k + "_ci95"] < 0 for k in GATE_METRICS)
    return seed_count_rule(record, "PASS" if any(passes) and not worse else "fail")


def seed_count_rule(record, verdict):
    """``verdict``, or undecided where a gate metric has fewer than MIN_GATE_SEEDS pairs."""
    # Issue 18 asks for at least 5 seeds: fewer seeds reaching the matched
    # accuracy cannot decide, whichever way their interval falls.
    # A metric with no pairs at all predates the rows (runs.csv from before it existed): skipped.
    counts = [record.get(k + "_n", 0) for k in GATE_METRICS if record.get(k + "_n", 0) > 0]
    if not counts or min(counts) < MIN_GATE_SEEDS:
        return f"undecided (< {MIN_GATE_SEEDS} seeds reach it)"
    return verdict


def holm_verdicts(records, alpha=0.05):
    """The gate over a family of comparisons, corrected for testing many metrics at many levels.

    ``records`` are one scheme's ``compare_to_manual`` records at every matched accuracy of a
    table; the paired t-tests' p-values of their gate metrics (``GATE_METRICS``: shape / colour
    kept, p(shape / colour kept), shape / colour entropy; each with >= 2 pairs) are one family,
    6 x the number of levels tests, adjusted by Holm's step-down method (each record gets them
    as ``<metric>_p_holm``); the drift metrics and the feature spread are not tested. Returns
    one verdict per record: PASS where some gate metric's adjusted p is under ``alpha`` with a
    positive difference and none with a negative one, followed by the record's smallest
    adjusted p and its metric, e.g. ``"fail (p 0.21, shape kept)"``."""
    tests = [(i, k) for i, r in enumerate(records) for k in GATE_METRICS if r.get(k + "_n", 0) >= 2]
    for (i, k), p in zip(tests, sc.holm_adjust([records[i][k + "_p"] for i, k in tests])):
        records[i][k + "_p_holm"] = p
    verdicts = []
    for i, record in enumerate(records):
        own = [k for j, k in tests if j == i]
        signs = [1 if record[k] > 0 else -1 for k in own if record[k + "_p_holm"] < alpha]
        verdict = seed_count_rule(record, "PASS" if 1 in signs and -1 not in signs else "fail")
        best = min(own, key=lambda k: record[k + "_p_holm"]) if own else None  # the first gate metric on a tie
        if best is not None and not verdict.startswith("undecided"):
            p = record[best + "_p_holm"]
            verdict += f" (p {p:.2g}, {METRIC_LABELS[best]})" if p < 1 else " (p 1)"
        verdicts.append(verdict)
    return verdicts


def paired_differences(matched, worlds, lrs, args):
    """Markdown lines and ``differences.csv`` records of each scheme minus manual, with the gate
    as written (95% intervals; oracle rows) and, for every scheme, the same verdict ("better
    than NADA on some gate metric, worse on none") Holm-corrected over the scheme's gate metrics
    at all of the table's matched accuracies (one family per world, learning rate and scheme)."""
    lines = ["", "### Paired differences at matched target accuracy (seed by seed; 95% t-interval)", "",
             "| world | lr | target acc | comparison | " + " | ".join(label for _, label, _ in CURVE_METRICS) + " | gate (oracle) | better than NADA, Holm (6 gate metrics × levels) |",
             "|" + "---|" * (6 + len(CURVE_METRICS))]
    gates = []
    for world in worlds:
        for lr in lrs:
            rows = []
            for acc in args.match_acc:
                base = matched.get((world, "manual", lr, acc))
                for scheme in [s for s in schemes_in(k[1] for k in matched) if s != "manual"]:
                    other = matched.get((world, scheme, lr, acc))
                    if not base or not other:
                        continue
                    record = dict(world=world, lr=lr, match_acc=acc, comparison=f"{scheme} - manual")
                    cells, passes = compare_to_manual(base, other, record)
                    record["gate"] = gate_verdict(record, passes) if scheme == "oracle" else ""
                    rows.append((scheme, record, cells))
            for scheme in dict.fromkeys(scheme for scheme, _, _ in rows):  # one family per scheme
                family = [record for other, record, _ in rows if other == scheme]
                for record, verdict in zip(family, holm_verdicts(family)):
                    record["gate_holm"] = verdict
            for scheme, record, cells in rows:
                gates.append(record)
                lines.append(f"| {world} | {lr:g} | {record['match_acc']:g} | {record['comparison']} | " + " | ".join(cells)
                             + f" | {record['gate'] or '–'} | {record['gate_holm'] or '–'} |")
    return lines, gates


BUDGET_METRICS = (("target_acc", "target acc"), ("shape_acc", "shape kept"), ("color_acc", "colour kept"),
                  ("drift_to_bias_color", "→ biased colour"), ("drift_to_bias_shape", "→ biased shape"))


def _number(value):
    """A runs.csv cell as a float; NaN for an empty one (a metric the row predates)."""
    return float(value) if value not in (None, "") else float("nan")


def equal_budget_differences(rows, worlds, lrs):
    """Markdown lines: scheme - manual at each run's last iteration (the same budget), paired
    by seed. Matched accuracy cannot compare a scheme that stylises less; this shows it."""
    last = {}
    for r in rows:
        key = (r["world"], r["scheme"], float(r["lr"]), int(r["seed"]))
        if int(r["iteration"]) > int(last.get(key, {"iteration": 0})["iteration"]):
            last[key] = r
    lines = ["", "### Paired differences at equal budget (the last iteration; seed by seed; 95% t-interval)", "",
             "| world | lr | comparison | iteration | " + " | ".join(label for _, label in BUDGET_METRICS) + " |",
             "|" + "---|" * (4 + len(BUDGET_METRICS))]
    for world in worlds:
        for lr in lrs:
            schemes = schemes_in(k[1] for k in last if k[0] == world and k[2] == lr)
            for scheme in [s for s in schemes if s != "manual"]:
                seeds = [k[3] for k in last if k[:3] == (world, scheme, lr) and (world, "manual", lr, k[3]) in last]
                if not seeds:
                    continue
                cells = []
                for key, _ in BUDGET_METRICS:
                    # summarise drops NaN: a metric the target has no biased content for, or a
                    # column an older runs.csv does not have
                    diffs = [_number(last[(world, scheme, lr, s)].get(key)) - _number(last[(world, "manual", lr, s)].get(key))
                             for s in seeds]
                    mean, half, n = summarise(diffs)
                    cells.append("–" if n == 0 else f"{mean:+.3f} ± {half:.3f} (n={n})")
                iteration = last[(world, scheme, lr, seeds[0])]["iteration"]
                lines.append(f"| {world} | {lr:g} | {scheme} - manual | {iteration} | " + " | ".join(cells) + " |")
    return lines


def analyse(rows, args, source_metrics, out):
    """Tables of values at matched target accuracy and the gate, from runs.csv rows."""
    matched = matched_values(rows, args, source_metrics)
    worlds = sorted({k[0] for k in matched}, key=lambda w: (w != "control", w))
    lrs = sorted({k[2] for k in matched})
    lines, table = matched_table(matched, worlds, lrs, args)
    difference_lines, gates = paired_differences(matched, worlds, lrs, args)
    budget_lines = equal_budget_differences(rows, worlds, lrs)
    text = "\n".join(lines + difference_lines + budget_lines) + "\n"
    (out / "matched.md").write_text(text)
    for name, recs in (("matched.csv", table), ("differences.csv", gates)):
        if recs:
            write_csv(out / name, recs)
    return text


def curve_records(rows):
    """Per world, scheme, lr and milestone (control first, then sorted), the mean over seeds of
    target accuracy and every curve metric: what ``curves.md`` lists and the curve plots draw."""
    groups = {}
    for r in rows:
        groups.setdefault((r["world"], r["scheme"], float(r["lr"]), int(r["iteration"])), []).append(r)
    records = []
    for (world, scheme, lr, iteration), members in sorted(groups.items(), key=lambda kv: (kv[0][0] != "control", kv[0])):
        record = dict(world=world, scheme=scheme, lr=lr, iteration=iteration, seeds=len(members))
        for key in ["target_acc"] + [k for k, _, _ in CURVE_METRICS]:
            values = [v for v in (_number(m.get(key)) for m in members) if v == v]
            record[key] = sum(values) / len(values) if values else float("nan")
        records.append(record)
    return records


def write_curves(rows, args, out):
    """``curves.csv`` / ``curves.md``: per world, scheme, lr and milestone, the mean over seeds
    of target accuracy and every curve metric (the curves the matched values are read from)."""
    records = curve_records(rows)
    if not records:
        return
    with open(out / "curves.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    lines = ["| world | scheme | lr | iteration | seeds | target acc | " + " | ".join(l for _, l, _ in CURVE_METRICS) + " |",
             "|" + "---|" * (6 + len(CURVE_METRICS))]
    for r in records:
        lines.append(f"| {r['world']} | {scheme_label(r['scheme'])} | {r['lr']:g} | {r['iteration']} | {r['seeds']} | {r['target_acc']:.3f} | "
                     + " | ".join(f"{r[k]:.3f}" for k, _, _ in CURVE_METRICS) + " |")
    (out / "curves.md").write_text("### Curves (mean over seeds per milestone)\n\n" + "\n".join(lines) + "\n")


def curve_panels(records, key):
    """``{world: {series label: [(target acc, value), ...]}}`` of metric ``key`` from
    ``curve_records``: one series per scheme (in table order) and lr, points by iteration.
    Milestones without a value (a metric older rows lack, NaN drift) are left out."""
    lrs = sorted({r["lr"] for r in records})
    panels = {}
    for scheme in schemes_in(r["scheme"] for r in records):
        for lr in lrs:
            # The lr joins the label only when it tells series apart.
            label = scheme_label(scheme) + (f", lr {lr:g}" if len(lrs) > 1 else "")
            for r in records:  # sorted by iteration within a world, scheme and lr
                if r["scheme"] == scheme and r["lr"] == lr and r["target_acc"] == r["target_acc"] and r[key] == r[key]:
                    panels.setdefault(r["world"], {}).setdefault(label, []).append((r["target_acc"], r[key]))
    # Panels in the tables' world order (control first), whatever scheme came first.
    worlds = list(dict.fromkeys(r["world"] for r in records))
    return {world: panels[world] for world in worlds if world in panels}


def curve_plots(rows, args, out):
    """``plots/curve_KEY.png`` per curve metric: target accuracy (x) vs the metric (y), mean
    over seeds per milestone, one panel per world (``line_plots``: matplotlib, else PIL)."""
    records = curve_records(rows)
    lrs = sorted({r["lr"] for r in records})
    lr_note = f" (lr {lrs[0]:g})" if len(lrs) == 1 else ""  # one lr: said once, not in every label
    for key, label, _ in CURVE_METRICS:
        panels = curve_panels(records, key)
        if panels:  # a metric no row has (runs.csv older than it) gets no plot
            titled = {f"{world}{lr_note}: {label}": series for world, series in panels.items()}
            line_plot(out / "plots" / f"curve_{key}.png", titled, f"target acc ({args.target})", label)


# ------------------------------------------------------------------------------ main


FIELDS = ["key", "world", "scheme", "lr", "seed", "iteration", "target_acc", "shape_acc", "color_acc", "position_err_px",
          "size_err_px", "shape_entropy", "color_entropy", "feature_spread", "raw_feature_spread", "shape_prob_kept", "color_prob_kept", "drift_to_bias_shape", "drift_to_bias_color",
          "stage1_heldout_retrieval", "dt_mean_pairwise_cos", "dt_residual_norm", "content_alignment",
          "stage1_seconds", "stage2_seconds"]


@dataclass
class Models:
    """The models every world shares, and the digests of their files."""

    oracle: object
    oracle_path: Path
    backend: object
    digests: dict
    world_digests: dict


def upgrade_header(path):
    """Rewrite an older runs.csv under today's FIELDS (a metric it predates stays empty), so
    appended rows line up with the header; atomic, the old file is replaced only when complete."""
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames == FIELDS:
            return
        rows = list(reader)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


class RunsWriter:
    """``runs.csv`` opened for appending (header written when new); every row also joins ``current``."""

    def __init__(self, path, current):
        upgrade_header(path)
        new_file = not path.is_file()
        self.handle = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=FIELDS, extrasaction="ignore")
        if new_file:
            self.writer.writeheader()
        self.current = current

    def write(self, row, flush=False):
        """Append one row to runs.csv and, as strings like those read back, to ``current``."""
        self.writer.writerow(row)
        if flush:
            self.handle.flush()
        self.current.append({k: str(v) for k, v in row.items()})

    def close(self):
        """Close runs.csv."""
        self.handle.close()


def load_models(args, worlds, device):
    """Load the evaluation oracle and the backend's source model; digest them and every world's CLIP."""
    from ipl_diffusion.shapes.oracle import ShapesOracle

    oracle_path = Path(args.oracle or default_model_path("oracle"))
    oracle = ShapesOracle.from_pretrained(str(oracle_path)).eval()
    backend = make_backend(args, device)
    digests = dict(backend.model_digests(folder_digest), oracle=folder_digest(oracle_path))
    world_digests = {name: folder_digest(path) for name, path in worlds.items()}
    return Models(oracle, oracle_path, backend, digests, world_digests)


def load_rescore_source(args, out):
    """``--rescore_from``'s config and runs.csv rows, or None without the option."""
    if not args.rescore_from:
        return None
    old = Path(args.rescore_from)
    if old.resolve() == out.resolve():
        raise ValueError("--rescore_from must be another folder than --output_dir (its config.json names the runs to re-score)")
    rescore = dict(config=json.loads((old / "config.json").read_text()))
    with open(old / "runs.csv") as handle:
        rescore["rows"] = list(csv.DictReader(handle))
    return rescore


def world_run_keys(args, worlds, models, rescore):
    """Per world, the key that marks its rows of runs.csv (see ``run_settings_key``)."""
    keys = {}
    for name in worlds:
        digests = dict(models.digests, clip=models.world_digests[name])
        if rescore is not None:  # the images were made by the old runs; only the scoring is new
            digests["rescored_from"] = rescore["config"]["run_keys"][name]
        keys[name] = run_settings_key(args, digests)
    return keys


def read_current_runs(runs_path, keys, last_milestone):
    """The rows of runs.csv made with the current keys, and the runs among them already finished."""
    rows = []
    if runs_path.is_file():
        with open(runs_path) as handle:
            rows = list(csv.DictReader(handle))
    valid_keys = set(keys.values())
    current = [r for r in rows if r["key"] in valid_keys]
    if len(current) < len(rows):
        print(f"{len(rows) - len(current)} rows of runs.csv were made with other models or settings: ignored")
    current = last_attempts(current)
    done = {(r["key"], r["world"], r["scheme"], float(r["lr"]), int(r["seed"])) for r in current if int(r["iteration"]) == last_milestone}
    return current, done


def last_attempts(rows):
    """``rows`` less those of a run's interrupted attempts: a run stopped before its last
    milestone is run again from iteration 0 on resuming and its new rows appended, so a row at
    iteration 0 starts the run's rows anew (kept in file order)."""
    attempts = {}
    for r in rows:
        ident = (r["key"], r["world"], r["scheme"], float(r["lr"]), int(r["seed"]))
        if int(r["iteration"]) == 0 or ident not in attempts:
            attempts[ident] = []
        attempts[ident].append(r)
    return [r for group in attempts.values() for r in group]


def evaluation_set(backend, oracle, args):
    """The fixed evaluation set: the unadapted model's images ``ev_x`` (iteration 0 of every
    curve), the ``ev`` dict runs are scored against, and the metrics of ``ev_x`` (with
    ``photos``: those of the source photos too, under ``"photos"``)."""
    ev_x, ev = backend.evaluation_set(oracle, args)
    source_metrics = score(oracle, ev_x, ev, args.target)
    if "photos" in ev:
        source_metrics["photos"] = score(oracle, ev["photos"], ev, args.target)
    return ev_x, ev, source_metrics


def check_output_backend(out, args):
    """Refuse an output folder whose ``config.json`` (and so its tables) is another backend's."""
    path = out / "config.json"
    if path.is_file():
        made_with = json.loads(path.read_text()).get("backend", "stylegan2")  # older configs: the GAN's
        if made_with != args.backend:
            raise ValueError(f"{out} holds --backend {made_with} results; give --backend {args.backend} another --output_dir")


def write_config(args, out, models, keys, source_metrics):
    """``config.json``: every option, the model paths and digests, the run keys and the source's metrics.

    A folder filled by several invocations (other worlds or schemes) keeps the earlier worlds'
    keys and digests, and lists every invocation's options in ``invocations``, so the file
    says how every row of runs.csv was made."""
    path = out / "config.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    options = dict(vars(args))
    config = dict(options, source_model=str(models.backend.path), oracle_path=str(models.oracle_path), model_digests=models.digests,
                  world_digests={**old.get("world_digests", {}), **models.world_digests},
                  run_keys={**old.get("run_keys", {}), **keys}, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                  source_metrics=source_metrics)
    config["invocations"] = old.get("invocations", []) + [json.loads(json.dumps(options, default=str))]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=1, default=str))
    tmp.replace(path)


def run_images_name(world, scheme, lr, seed):
    """File name of one run's saved milestone images (under ``--images_dir``/KEY)."""
    return f"{world}_{scheme}_lr{lr:g}_seed{seed}.safetensors"


def rescore_run(path, start, ident, oracle, ev, target):
    """runs.csv rows of one earlier run re-scored from its saved images: its iteration-0 row, then one per milestone."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    info = {k: start[k] for k in FIELDS if k.startswith(("stage1_", "dt_", "content_"))}
    rows = [dict(ident, iteration=0, **info)]
    for name, images in sorted(saved.items(), key=lambda item: int(item[0].split("_")[1])):
        images = images.float() / 127.5 - 1
        metrics = score(oracle, images, ev, target)
        rows.append(dict(ident, iteration=int(name.split("_")[1]), **info, **metrics))
    return rows


def rescore_runs(args, worlds, keys, done, rescore, oracle, ev, writer):
    """Score the images saved by ``--rescore_from``'s runs with this oracle; append their rows."""
    for world in worlds:
        old_key = rescore["config"]["run_keys"][world]
        starts = [r for r in rescore["rows"] if r["key"] == old_key and int(r["iteration"]) == 0]
        for start in starts:
            scheme, lr, seed = start["scheme"], float(start["lr"]), int(start["seed"])
            path = Path(args.images_dir) / old_key / run_images_name(world, scheme, lr, seed)
            if (keys[world], world, scheme, lr, seed) in done or not path.is_file():
                continue
            ident = dict(key=keys[world], world=world, scheme=scheme, lr=lr, seed=seed)
            for row in rescore_run(path, start, ident, oracle, ev, args.target):
                writer.write(row)


def prepare_worlds(worlds, args, diag, device):
    """Load every world's CLIP; returns per world ``(encoder, image_features, diag)`` (``diag``:
    the backend's ``diagnostics_set`` with the content captions' features ``c`` in this world)
    and its text-only diagnostics rows."""
    state, diag_rows = {}, []
    for world, clip_path in worlds.items():
        encoder, image_features = load_world_clip(clip_path, device)
        wd = world_diagnostics(encoder, args.target)
        diag_rows.append(dict(world=world, clip=str(clip_path), **wd))
        print(f"world {world}: {wd}", flush=True)
        state[world] = (encoder, image_features, dict(diag, c=content_features(encoder, *diag["content"])))
    return state, diag_rows


def record_run(writer, backend, oracle, world_state, ident, args, ev):
    """One run, its rows written as its milestones are scored.

    Returns the run-level diagnostics, the last metrics and the uint8 images per milestone
    (for ``--images_dir``, from which the grids are drawn).
    """
    encoder, image_features, diag = world_state
    info, metrics, saved = {}, None, {}
    for iteration, metrics, images in run_one(backend, world_state, oracle, ident["scheme"], ident["seed"], ident["lr"], args, ev):
        if iteration == 0:
            info = metrics
            row = dict(ident, iteration=0, **info)
        else:
            row = dict(ident, iteration=iteration, **info, **metrics)
            saved[f"iteration_{iteration}"] = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        writer.write(row, flush=True)
    return info, metrics, saved


def save_run_images(saved, folder, name):
    """Save one run's milestone images (uint8 safetensors) as ``folder/name``."""
    if not saved:
        return
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(saved, str(folder / name))


def run_all(args, worlds, state, keys, done, writer, backend, oracle, ev, started):
    """Every run not yet done (progress timed from ``started``); each run's milestone images
    are saved under ``--images_dir``/KEY, from which the grids are drawn."""
    # Seeds outermost, then worlds: an interrupted benchmark has paired seeds in every world.
    for lr in args.learning_rates:
        for seed in args.seeds:
            for world in worlds:
                for scheme in args.schemes:
                    if (keys[world], world, scheme, lr, seed) in done:
                        continue
                    ident = dict(key=keys[world], world=world, scheme=scheme, lr=lr, seed=seed)
                    info, metrics, saved = record_run(writer, backend, oracle, state[world], ident, args, ev)
                    save_run_images(saved, Path(args.images_dir) / keys[world], run_images_name(world, scheme, lr, seed))
                    print(f"[{time.time() - started:6.0f}s] {world} {scheme} lr={lr:g} seed={seed}: "
                          f"acc {metrics['target_acc']:.2f} shape {metrics['shape_acc']:.2f} colour {metrics['color_acc']:.2f} "
                          f"align {info['content_alignment']:.3f} spread {info['dt_mean_pairwise_cos']:.3f}", flush=True)


def saved_grid_rows(current, worlds, keys, args):
    """``{world: {scheme: {iteration: (target_acc, first 12 images)}}}`` of every ``--schemes``
    scheme in ``current`` (runs.csv's rows of the current keys, ``read_current_runs``), its run at
    the first ``--seeds`` seed and the first ``--learning_rates`` lr, read back from the saved images. Drawn from runs.csv rather than from this invocation's runs, so a
    folder that several commands filled shows every scheme its command names, whichever command
    ran it; a run whose images are gone is left out."""
    from safetensors.torch import load_file

    grid_rows = {}
    for world in worlds:
        rows = [r for r in current if r["world"] == world and int(r["iteration"]) > 0 and r["scheme"] in args.schemes]
        lr, seed = args.learning_rates[0], args.seeds[0]
        for scheme in schemes_in(r["scheme"] for r in rows):
            accs = {int(r["iteration"]): float(r["target_acc"]) for r in rows
                    if r["scheme"] == scheme and float(r["lr"]) == lr and int(r["seed"]) == seed}
            path = Path(args.images_dir) / keys[world] / run_images_name(world, scheme, lr, seed)
            if not accs or not path.is_file():
                continue
            saved = load_file(str(path))
            grid_rows.setdefault(world, {})[scheme] = {
                it: (acc, saved[f"iteration_{it}"][:12].float() / 127.5 - 1) for it, acc in accs.items() if f"iteration_{it}" in saved}
    return grid_rows


def write_grids(grid_rows, ev_x, source_label, args, out):
    """Grid per world: the source row, then per scheme the first milestone at or above the
    highest matched accuracy (else the last), first seed. ``source_label``: ``(row label,
    its description)``."""
    for world, per_scheme in grid_rows.items():
        rows_img, labels = [ev_x[:12]], []
        for scheme in schemes_in(per_scheme):
            if scheme in per_scheme:
                its = sorted(per_scheme[scheme])
                pick = next((i for i in its if per_scheme[scheme][i][0] >= max(args.match_acc)), its[-1])
                rows_img.append(per_scheme[scheme][pick][1])
                labels.append(f"{scheme}@{pick} (acc {per_scheme[scheme][pick][0]:.2f})")
        stem = f"{world}_{args.target.replace(' ', '_')}"
        labelled_grid(rows_img, [source_label[0], *labels]).save(out / "grids" / f"{stem}.png")
        (out / "grids" / f"{stem}.txt").write_text(
            f"rows: {source_label[1]}, " + ", ".join(labels) + " (scheme@iteration, first seed)\n")


def direction_diagnostics_lines(current, worlds, args, diag_label):
    """Markdown lines of the per-run direction diagnostics, mean ± 95% interval over seeds."""
    lines = ["", f"### Direction diagnostics ({diag_label}; mean ± 95% interval over seeds)", "",
             "| world | scheme | Stage-1 held-out retrieval | ΔT_i mean pairwise cos | ΔT residual / mean | content alignment |", "|---|---|---|---|---|---|"]
    for world in worlds:
        for scheme in schemes_in(r["scheme"] for r in current):
            sel = [r for r in current if r["world"] == world and r["scheme"] == scheme and int(r["iteration"]) == 0]
            if not sel:
                continue
            cells = []
            for k in ("stage1_heldout_retrieval", "dt_mean_pairwise_cos", "dt_residual_norm", "content_alignment"):
                mean, half, n = summarise([float(r[k]) for r in sel])
                cells.append("–" if n == 0 else f"{mean:.3f} ± {half:.3f}")
            lines.append(f"| {world} | {scheme_label(scheme)} | " + " | ".join(cells) + " |")
    return lines


def write_tables(current, worlds, args, source_metrics, diag_label, out):
    """matched.md (with the direction diagnostics), the curves and the plots, from the runs' rows."""
    current = last_attempts(current)  # this invocation's rows may redo a run interrupted before
    curves_rows = [r for r in current if int(r["iteration"]) > 0]
    diag_summary = direction_diagnostics_lines(current, worlds, args, diag_label)
    text = analyse(curves_rows, args, source_metrics, out) + "\n".join(diag_summary) + "\n"
    (out / "matched.md").write_text(text)
    write_curves(curves_rows, args, out)
    curve_plots(curves_rows, args, out)
    print(text)
    print(f"results in {out}")


def adapt_all(args, worlds, models, keys, done, runs_path, current, ev_x, ev, device, out):
    """Run every missing run (appending to runs.csv), then write the grids and world diagnostics."""
    backend = models.backend
    diag = backend.diagnostics_set(models.oracle, args, ev)
    writer = RunsWriter(runs_path, current)
    try:
        started = time.time()
        state, diag_rows = prepare_worlds(worlds, args, diag, device)
        run_all(args, worlds, state, keys, done, writer, backend, models.oracle, ev, started)
    finally:
        writer.close()
    # ``current``: the earlier rows of the current keys plus this invocation's (RunsWriter adds them).
    write_grids(saved_grid_rows(current, worlds, keys, args), ev_x, backend.source_label(args), args, out)
    if diag_rows:
        write_csv(out / "world_diagnostics.csv", diag_rows)


def main(argv=None):
    """Run (or re-score) every missing run, then write the tables, curves, plots and grids."""
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    worlds = parse_worlds(args.worlds)
    out = Path(args.output_dir)
    check_output_backend(out, args)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    device = "cpu"
    models = load_models(args, worlds, device)
    rescore = load_rescore_source(args, out)
    keys = world_run_keys(args, worlds, models, rescore)
    runs_path = out / "runs.csv"
    current, done = read_current_runs(runs_path, keys, args.milestones[-1])
    ev_x, ev, source_metrics = evaluation_set(models.backend, models.oracle, args)
    if not args.tables_only:  # the tables are re-derived; the record of how the runs were made stays
        write_config(args, out, models, keys, source_metrics)

    if rescore is not None and not args.tables_only:
        writer = RunsWriter(runs_path, current)
        try:
            rescore_runs(args, worlds, keys, done, rescore, models.oracle, ev, writer)
            print(f"re-scored {sum(1 for r in current if int(r['iteration']) == 0)} runs with {models.oracle_path}")
        finally:
            writer.close()
    elif not args.tables_only:
        adapt_all(args, worlds, models, keys, done, runs_path, current, ev_x, ev, device, out)

    write_tables(current, worlds, args, source_metrics, models.backend.diagnostics_label(args), out)


if __name__ == "__main__":
    main()
