#!/usr/bin/env python
"""Mode-collapse benchmark on the Shapes world: IPL's adaptive prompts vs NADA's fixed direction.

The paper's central claim (IPL §1, §4.2, §4.4) is that one fixed text direction for every
image (NADA, the ``manual`` scheme) pushes all adapted images towards the same look -- mode
collapse -- while image-specific prompts (``adaptive``, IPL) keep the source images' diversity.
On real data this is judged by eye and by IS / SCS / intra-LPIPS. The Shapes world has
ground-truth factors, so we can *measure* it with the Shapes oracle (trained on all styles,
never used in adaptation):

* **target-style accuracy** -- the fraction of adapted images the oracle reads as the target style;
* **factor preservation** (our analogue of SCS / ID similarity) -- per image, does the adapted
  image keep its source image's shape and colour (accuracy), position and size (error in pixels);
* **diversity** -- entropy (nats) of the oracle's shape and colour distributions over the adapted
  images, next to the source's, and the mean pairwise distance of oracle features (ratio to
  the source's). Collapse shows as falling entropy / distance.

Protocol, per backend (``--backends``; both by default):

* **diffae** -- the source pipeline is the shipped Shapes Diff-IPL default (or ``--model``).
  For every target style x prompt scheme (manual = NADA, learned, random, adaptive = IPL) x
  seed, ``IPLPipeline.adapt`` runs both stages on ``--train_images`` rendered photos; the
  adapted model then translates ``--eval_images`` *held-out* rendered photos (invert with the
  source UNet to ``t0``, decode with the adapted one), and the oracle compares each
  translation with the ground truth of its source image. The source row is the same
  translation with the unadapted UNet, i.e. the DDIM reconstruction.
* **stylegan2** -- the source pipeline is the shipped Shapes GAN-IPL default (or
  ``--gan_model``). ``StyleGANIPLPipeline.adapt`` runs both stages (Stage 1 on its own cache of
  source samples); the adapted generator then renders ``--eval_images`` fixed ``z`` (seed
  31337) and each image is compared with the *source generator's* image of the same ``z``. A
  generated image has no ground truth, so the oracle's reading of the source image stands in
  for it; the source row is the source samples themselves (factor errors 0 by construction).

A λ sweep (Fig. 7: λ in {0, 1, 5, 10, 20}) repeats the adaptive scheme on the first target,
for each backend.

Outputs (``--output_dir``): ``runs.csv`` (one row per run; runs already there are skipped, so
an interrupted benchmark resumes), ``table.md`` / ``table.csv`` (means with 95% t-intervals
over seeds), ``lambda_sweep.md``, ``plots/*.png`` (matplotlib if installed, else drawn with
PIL) and ``grids/<target>.png`` (source row, then one row per scheme, first seed).

Usage::

    python benchmarks/shapes_collapse.py                 # full run (long on a CPU)
    python benchmarks/shapes_collapse.py --quick         # CI: one target, tiny budgets, < 5 min
    python benchmarks/shapes_collapse.py --backends stylegan2   # GAN-IPL rows only
"""

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from ipl_diffusion.shapes import COLORS, SHAPES, STYLES, ShapesRenderer, default_model_path  # noqa: E402
from ipl_diffusion.shapes.oracle import label_entropy as entropy  # noqa: E402
from ipl_diffusion.clip_text import CLIPPromptEncoder  # noqa: E402
from ipl_diffusion.grids import labelled_grid  # noqa: E402
from ipl_diffusion.metrics import FeatureDistance, clip_directional_similarity, clip_encoders  # noqa: E402
from ipl_diffusion.metrics import mean_pairwise_distance as metrics_mean_pairwise_distance  # noqa: E402
from ipl_diffusion.shapes.oracle import ShapesOracle  # noqa: E402

BACKENDS = ("diffae", "stylegan2")
SCHEMES = ("manual", "learned", "random", "adaptive")
SCHEME_NAMES = {"manual": "manual (NADA)", "learned": "learned", "random": "random", "adaptive": "adaptive (IPL)"}
METRICS = (
    ("target_acc", "target-style acc", "higher"),
    ("shape_acc", "shape kept", "higher"),
    ("color_acc", "colour kept", "higher"),
    ("position_err_px", "position err (px)", "lower"),
    ("size_err_px", "size err (px)", "lower"),
    ("shape_entropy", "shape entropy (nats)", "higher"),
    ("color_entropy", "colour entropy (nats)", "higher"),
    ("feature_spread", "feature spread (x source)", "higher"),
    ("clip_direction", "CLIP directional sim.", "higher"),
    ("lpips_diversity", "LPIPS-style diversity (oracle features)", "higher"),
)
# Two-sided 95% Student-t quantiles for n - 1 degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--model", default=None, help="source IPLPipeline folder (default: the shipped Shapes model)")
    p.add_argument("--gan_model", default=None, help="source StyleGANIPLPipeline folder (default: the shipped Shapes GAN)")
    p.add_argument("--oracle", default=None, help="oracle folder (default: the shipped Shapes oracle)")
    p.add_argument("--output_dir", default="benchmarks/results/shapes_collapse")
    p.add_argument("--targets", nargs="+", default=["sketch", "neon", "pixel art", "mosaic"])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lambdas", nargs="*", type=float, default=[0, 1, 5, 10, 20], help="λ sweep (adaptive, first target)")
    p.add_argument("--lambda_domain", type=float, default=1.0, help="λ of Eq. 6 for the scheme comparison")
    p.add_argument("--train_images", type=int, default=None, help="diffae Stage-2 photos (default: the shipped num_images)")
    p.add_argument("--stage1_images", type=int, default=None, help="diffae Stage-1 pool (default: the shipped stage1_num_images)")
    p.add_argument("--eval_images", type=int, default=32)
    # Every adaptation option below defaults to None: the shipped folder's recorded
    # adapt_defaults, i.e. what `ipl adapt` runs (ipl_diffusion.shapes.SHAPES_*).
    p.add_argument("--stage1_iterations", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None, help="diffae Stage 2 iterations")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None, help="diffae Stage 2 learning rate")
    p.add_argument("--t0", type=int, default=None)
    p.add_argument("--num_inversion_steps", type=int, default=None)
    p.add_argument("--num_train_steps", type=int, default=None)
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--l1_loss_weight", type=float, default=None)
    p.add_argument("--gan_iterations", type=int, default=None)
    p.add_argument("--gan_batch_size", type=int, default=None)
    p.add_argument("--gan_learning_rate", type=float, default=None)
    p.add_argument("--gan_stage1_images", type=int, default=None, help="a fixed Stage-1 pool (default: fresh samples)")
    p.add_argument("--truncation", type=float, default=0.7, help="psi of the GAN evaluation samples (as NADA / IPL)")
    p.add_argument("--quick", action="store_true", help="CI mode: one target, one seed, tiny budgets (< 5 min)")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.quick:
        # --quick never writes into the committed results folder: there it goes under runs/.
        if Path(args.output_dir).resolve().is_relative_to((REPO / "benchmarks" / "results").resolve()):
            args.output_dir = str(REPO / "runs" / "shapes_collapse_quick")
        args.targets = args.targets[:1]
        args.seeds = args.seeds[:1]
        args.lambdas = [0.0, 10.0]
        args.train_images, args.stage1_images, args.eval_images = 8, 64, 16
        args.stage1_iterations, args.iterations = 20, 3
        args.batch_size = 2
        args.num_inversion_steps, args.num_train_steps, args.num_inference_steps = 6, 2, 6
        args.gan_iterations, args.gan_stage1_images = 3, 16
    return args


# ------------------------------------------------------------------------------ metrics


def mean_pairwise_distance(features):
    d = torch.cdist(features, features)
    n = features.shape[0]
    return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0


def evaluate_images(oracle, images, factors, target_index, side, reference_spread=None):
    """Oracle metrics of ``images`` (B,3,H,W) in [-1,1] translated from sources with ``factors``."""
    pred = oracle.predict(images)
    spread = mean_pairwise_distance(pred["features"])
    return dict(
        target_acc=float((pred["style"] == target_index).float().mean()),
        shape_acc=float((pred["shape"] == factors.shape).float().mean()),
        color_acc=float((pred["color"] == factors.color).float().mean()),
        position_err_px=float((pred["position"] - factors.position).norm(dim=1).mean() * side),
        size_err_px=float((pred["size"] - factors.size).abs().mean() * side),
        shape_entropy=entropy(pred["shape"], len(SHAPES)),
        color_entropy=entropy(pred["color"], len(COLORS)),
        feature_spread=spread / reference_spread if reference_spread else 1.0,
        raw_feature_spread=spread,
    )


def summarise(values):
    """(mean, half-width of the 95% t-interval); half-width 0 for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with an integer ``df`` >= 1 degrees of freedom.

    The closed forms of Abramowitz & Stegun 26.7.3 (odd ``df``) and 26.7.4 (even ``df``) for
    A(t|df) = P(|T| <= t), with theta = atan(|t| / sqrt(df)); the stack has no t distribution
    (torch's StudentT has no cdf). Raises ValueError for ``df`` < 1."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    # Both series run over cos^(2k) theta; odd df's coefficients are 2.4...(2k) / 1.3...(2k+1).
    term, series = (math.cos(theta), 0.0) if df % 2 else (1.0, 0.0)
    for k in range((df - 1) // 2 if df % 2 else df // 2):
        series += term
        term *= c2 * ((2 * k + 2) / (2 * k + 3) if df % 2 else (2 * k + 1) / (2 * k + 2))
    if df % 2:
        inside = 2 / math.pi * (theta + math.sin(theta) * series)
    else:
        inside = math.sin(theta) * series
    return min(1.0, max(0.0, 1.0 - inside))


def holm_adjust(p_values):
    """Holm's step-down adjusted p-values (Holm 1979), in the order given: with m tests, the
    i-th smallest p is multiplied by m - i + 1 and made no smaller than the one before it."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------------------ running


def load_source_pipeline(backend, model, device):
    if backend == "stylegan2":
        from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline as cls
    else:
        from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline as cls
    path = Path(model) if model else default_model_path(backend)
    pipe = cls.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), str(path)


def gan_samples(pipe, z, args, source=False):
    """``(B, 3, H, W)`` in [-1, 1]: the (source or adapted) generator's images of ``z``."""
    return pipe(latents=z, truncation=args.truncation, source=source, output_type="pt").images.cpu() * 2 - 1


def translate(pipe, images, args):
    out = pipe(
        images,
        t0=args.t0,
        num_inversion_steps=args.num_inversion_steps,
        num_inference_steps=args.num_inference_steps,
        output_type="pt",
    ).images
    return out.cpu() * 2 - 1  # "pt" is [0, 1]


def shapes_training_images(pipe, args, seed):
    """diffae: the Stage-2 photos and the Stage-1 pool ``ipl adapt`` renders for ``seed``
    (ipl_diffusion.shapes.shapes_source_images), with --train_images / --stage1_images
    overriding the shipped counts."""
    from ipl_diffusion.shapes import shapes_source_images

    inputs = shapes_source_images(pipe, args.train_images, seed, args.stage1_images)
    return inputs["images"], inputs["stage1_images"]


def run_key(backend, target, scheme, seed, lam):
    return f"{backend}|{target}|{scheme}|{seed}|{lam:g}"


def clip_direction(clip, source_images, adapted_images, target):
    """Mean CLIP directional similarity (ipl_diffusion.metrics) under the Shapes CLIP: how well
    each source -> adapted image direction follows the "photo" -> ``target`` text direction."""
    image_encoder, label_encoder = clip
    values = clip_directional_similarity(
        source_images, adapted_images, label_encoder("photo"), label_encoder(target), image_encoder
    )
    return float(values.mean())


def lpips_diversity(oracle, images):
    """Mean pairwise LPIPS-style distance (ipl_diffusion.metrics.FeatureDistance) with the
    Shapes oracle's penultimate features standing in for LPIPS' network, which has no
    pretrained weights for this world."""
    distance = FeatureDistance(lambda x: oracle.predict(x)["features"])
    return metrics_mean_pairwise_distance(images, distance)


def adapt_and_evaluate(backend, arm, target, scheme, seed, lam, args, oracle, clip):
    """One adaptation run of ``arm.pipe`` (:func:`prepare_backend`); ``arm.eval_input`` is what
    the adapted model turns into the evaluated images (held-out photos for diffae, fixed ``z``
    for stylegan2), ``arm.eval_x`` their source images and ``arm.eval_factors`` their factors."""
    t = time.time()
    pipe, eval_input, eval_x = arm.pipe, arm.eval_input, arm.eval_x
    if backend == "stylegan2":
        options = dict(stage1_num_images=args.gan_stage1_images, stage1_iterations=args.stage1_iterations,
                       iterations=args.gan_iterations, batch_size=args.gan_batch_size,
                       learning_rate=args.gan_learning_rate)
        adapted = pipe.adapt(target, scheme=scheme, lambda_domain=lam, seed=seed, progress=False,
                             **{k: v for k, v in options.items() if v is not None})
        images = gan_samples(adapted, eval_input, args)
    else:
        options = dict(stage1_iterations=args.stage1_iterations, t0=args.t0, num_inversion_steps=args.num_inversion_steps,
                       num_train_steps=args.num_train_steps, num_inference_steps=args.num_inference_steps,
                       learning_rate=args.learning_rate, iterations=args.iterations, batch_size=args.batch_size,
                       l1_loss_weight=args.l1_loss_weight)
        train_x, pool = shapes_training_images(pipe, args, seed)
        adapted = pipe.adapt(target, images=train_x, stage1_images=pool, scheme=scheme, lambda_domain=lam, seed=seed,
                             progress=False, **{k: v for k, v in options.items() if v is not None})
        adapted.set_progress_bar_config(disable=True)
        images = translate(adapted, eval_input, args)
    metrics = evaluate_images(oracle, images, arm.eval_factors, STYLES.index(target), eval_x.shape[-1], arm.reference_spread)
    metrics["clip_direction"] = clip_direction(clip, eval_x, images, target)
    metrics["lpips_diversity"] = lpips_diversity(oracle, images)
    metrics["seconds"] = time.time() - t
    return metrics, images


# ------------------------------------------------------------------------------ outputs


def write_table(rows, path_md, path_csv, title, source_rows=()):
    """Markdown (+ CSV) table of means ± 95% intervals per (backend, target, scheme, λ); the
    ``source_rows`` (one dict per backend) are appended as they are."""
    groups = {}
    for row in rows:
        groups.setdefault((row["backend"], row["target"], row["scheme"], row["lambda"]), []).append(row)
    lines = [f"### {title}", "", "| backend | target | scheme | λ | seeds | " + " | ".join(m[1] for m in METRICS) + " |"]
    lines.append("|" + "---|" * (5 + len(METRICS)))
    table_rows = []
    def order(key):  # backend, then target style, then scheme as listed, then λ
        backend, target, scheme, lam = key
        rank = lambda seq, x: seq.index(x) if x in seq else len(seq)  # noqa: E731
        return rank(BACKENDS, backend), rank(STYLES, target), rank(SCHEMES, scheme), lam

    for (backend, target, scheme, lam), members in sorted(groups.items(), key=lambda item: order(item[0])):
        cells, record = [], dict(backend=backend, target=target, scheme=scheme, **{"lambda": lam}, seeds=len(members))
        for key, _, _ in METRICS:
            # Rows from runs.csv written before a metric existed have no value for it.
            values = [float(m[key]) for m in members if m.get(key) not in (None, "")]
            if not values:
                cells.append("–")
                continue
            mean, half = summarise(values)
            record[key], record[key + "_ci95"] = mean, half
            cells.append(f"{mean:.3f} ± {half:.3f}" if len(members) > 1 else f"{mean:.3f}")
        table_rows.append(record)
        lines.append(f"| {backend} | {target} | {SCHEME_NAMES.get(scheme, scheme)} | {lam:g} | {len(members)} | " + " | ".join(cells) + " |")
    for row in source_rows:
        cells = ["–" if row[m] != row[m] else f"{row[m]:.3f}" for m, _, _ in METRICS]  # NaN -> –
        lines.append(f"| {row['backend']} | photo | {row['scheme']} | – | – | " + " | ".join(cells) + " |")
    Path(path_md).write_text("\n".join(lines) + "\n")
    if path_csv:
        with open(path_csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table_rows[0]))
            writer.writeheader()
            writer.writerows(table_rows)
    return "\n".join(lines), table_rows


def bar_plot(path, title, groups, labels, values, errors):
    """Grouped bar chart: ``values[g][l]`` for group g (x axis) and label l (colour)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 3.2))
        width = 0.8 / max(1, len(labels))
        for j, label in enumerate(labels):
            xs = [i + j * width for i in range(len(groups))]
            ax.bar(xs, [values[i][j] for i in range(len(groups))], width, yerr=[errors[i][j] for i in range(len(groups))], label=label, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))], groups)
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    except ImportError:
        pass
    from PIL import Image, ImageDraw

    colours = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (120, 120, 120)]
    w, h, pad = 120 + 110 * len(groups), 300, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    top = max([v + e for vs, es in zip(values, errors) for v, e in zip(vs, es)] + [1e-6])
    draw.text((pad, 8), title, fill="black")
    draw.line([(pad, h - pad), (w - 10, h - pad)], fill="black")
    bar_w = 90 / max(1, len(labels))
    for i, group in enumerate(groups):
        x0 = pad + 10 + i * 110
        draw.text((x0, h - pad + 6), group[:14], fill="black")
        for j in range(len(labels)):
            v, e = values[i][j], errors[i][j]
            y = h - pad - (h - 2 * pad) * v / top
            x = x0 + j * bar_w
            draw.rectangle([x, y, x + bar_w - 2, h - pad], fill=colours[j % len(colours)])
            ye = (h - 2 * pad) * e / top
            draw.line([(x + bar_w / 2, y - ye), (x + bar_w / 2, y + ye)], fill="black")
    for j, label in enumerate(labels):
        draw.rectangle([w - 100, 24 + 12 * j, w - 92, 32 + 12 * j], fill=colours[j % len(colours)])
        draw.text((w - 88, 22 + 12 * j), label[:14], fill="black")
    img.save(path)


# ------------------------------------------------------------------------------ main


def prepare_backend(backend, args, device, oracle, clip):
    """Load one backend's source pipeline and fix its evaluation set.

    Returns a namespace with ``pipe``, ``model_path``, ``train_x`` (diffae Stage 1/2 images),
    ``eval_input`` / ``eval_x`` / ``eval_factors`` (see :func:`adapt_and_evaluate`),
    ``reference_spread`` (oracle-feature spread of the source images), ``source_images`` and
    ``source_row`` (the unadapted model's metrics).
    """
    model = args.gan_model if backend == "stylegan2" else args.model
    pipe, model_path = load_source_pipeline(backend, model, device)
    side = pipe.image_size
    renderer = ShapesRenderer(side)
    if backend == "stylegan2":
        train_x = None
        eval_input = torch.randn(args.eval_images, pipe.source_generator.style_dim, generator=torch.Generator().manual_seed(31337))
        eval_x = gan_samples(pipe, eval_input, args, source=True)
        read = oracle.predict(eval_x)
        # No ground truth for generated images: the oracle's reading of the source image is
        # the reference each adapted image is compared with.
        eval_factors = SimpleNamespace(shape=read["shape"], color=read["color"], position=read["position"], size=read["size"])
        source_images = eval_x
    else:
        train_x = None  # rendered per seed, as `ipl adapt` does (shapes_training_images)
        eval_x, eval_factors = renderer.sample(args.eval_images, seed=31337, style="photo")
        read = oracle.predict(eval_x)
        eval_input = eval_x
        # The unadapted round trip: the floor of factor errors.
        source_images = translate(pipe, eval_x, args)
    reference_spread = mean_pairwise_distance(read["features"])
    source_row = evaluate_images(oracle, source_images, eval_factors, STYLES.index("photo"), side, reference_spread)
    source_row["clip_direction"] = float("nan")  # no target direction for the unadapted model
    source_row["lpips_diversity"] = lpips_diversity(oracle, source_images)
    name = "source (DDIM round trip, unadapted)" if backend == "diffae" else "source (G_s samples, unadapted)"
    source_row.update(backend=backend, target="photo", scheme=name, seed=0, **{"lambda": 0.0}, seconds=0.0)
    return SimpleNamespace(
        pipe=pipe, model_path=model_path, train_x=train_x, eval_input=eval_input, eval_x=eval_x, eval_factors=eval_factors,
        reference_spread=reference_spread, source_images=source_images, source_row=source_row,
    )


def load_runs(runs_path):
    """The runs an earlier (interrupted) invocation finished: ``{run_key: row}``."""
    done = {}
    if runs_path.is_file():
        with open(runs_path) as handle:
            reader = csv.DictReader(handle)
            if "backend" not in (reader.fieldnames or []):
                raise ValueError(f"{runs_path} was written by an older version of this benchmark (no backend column); move it away")
            for row in reader:
                done[run_key(row["backend"], row["target"], row["scheme"], int(row["seed"]), float(row["lambda"]))] = row
    return done


def run_backend(backend, arm, args, oracle, clip, done, writer, handle, started, out):
    """Every scheme x seed (and the λ sweep) of one backend not yet in ``done``; appends them to
    ``runs.csv`` as they finish and saves one grid per target (first seed)."""
    plan = [(t, s, seed, args.lambda_domain) for t in args.targets for s in args.schemes for seed in args.seeds]
    plan += [(args.targets[0], "adaptive", seed, float(lam)) for lam in args.lambdas for seed in args.seeds]
    seen, grids = set(), {}
    for target, scheme, seed, lam in plan:
        key = run_key(backend, target, scheme, seed, lam)
        if key in seen or key in done:
            seen.add(key)
            continue
        seen.add(key)
        metrics, images = adapt_and_evaluate(backend, arm, target, scheme, seed, lam, args, oracle, clip)
        row = dict(backend=backend, target=target, scheme=scheme, seed=seed, **{"lambda": lam}, **metrics)
        writer.writerow(row)
        handle.flush()
        done[key] = row
        print(f"[{time.time() - started:7.0f}s] {key}: " + ", ".join(f"{m}={row[m]:.3f}" for m, _, _ in METRICS), flush=True)
        if seed == args.seeds[0] and lam == args.lambda_domain:
            grids.setdefault(target, {})[scheme] = images[:12]
    # Grid rows: the source images, the unadapted model's output (diffae), one row per scheme.
    for target, per_scheme in grids.items():
        rows = [arm.eval_x[:12]] + ([arm.source_images[:12]] if backend == "diffae" else [])
        rows += [per_scheme[s] for s in args.schemes if s in per_scheme]
        # seamless, tiles upscaled 3x (nearest)
        grid = labelled_grid(rows, min_tile=3 * rows[0].shape[-1], margin=0)
        grid.save(out / "grids" / f"{backend}_{target.replace(' ', '_')}.png")


def write_plots(out, args, table_rows, sweep):
    """Per backend and metric: targets on the x axis, schemes as bars; and the λ sweep."""
    for backend in args.backends:
        backend_rows = [r for r in table_rows if r["backend"] == backend]
        targets = [t for t in args.targets if any(r["target"] == t for r in backend_rows)]
        for key, label, _ in METRICS[:2] + METRICS[5:]:
            values, errors = [], []
            for t in targets:
                match = {s: [r for r in backend_rows if r["target"] == t and r["scheme"] == s] for s in args.schemes}
                values.append([m[0].get(key, 0.0) if m else 0.0 for m in match.values()])
                errors.append([m[0].get(key + "_ci95", 0.0) if m else 0.0 for m in match.values()])
            if targets:
                bar_plot(out / "plots" / f"{backend}_{key}.png", f"{label} ({backend})", targets, [SCHEME_NAMES[s] for s in args.schemes], values, errors)
        backend_sweep = [r for r in sweep if r["backend"] == backend]
        if backend_sweep:
            lams = sorted({r["lambda"] for r in backend_sweep})
            stats = [[summarise([float(r[key]) for r in backend_sweep if r["lambda"] == lam])
                      for key in ("target_acc", "shape_acc", "feature_spread")] for lam in lams]
            values = [[mean for mean, _ in row] for row in stats]
            errors = [[half for _, half in row] for row in stats]
            bar_plot(out / "plots" / f"{backend}_lambda_sweep.png", f"λ sweep ({backend}, {args.targets[0]})", [f"λ={v:g}" for v in lams], ["target acc", "shape kept", "spread"], values, errors)


def main(argv=None):
    args = parse_args(argv)
    for target in args.targets:
        if target not in STYLES or target == "photo":
            raise ValueError(f"unknown target style {target!r}; choose from {', '.join(STYLES[1:])}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.output_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    oracle = ShapesOracle.from_pretrained(str(args.oracle or default_model_path("oracle"))).eval()
    clip = clip_encoders(CLIPPromptEncoder.from_pretrained(str(default_model_path("clip"))))

    runs_path = out / "runs.csv"
    done = load_runs(runs_path)
    fields = ["backend", "target", "scheme", "seed", "lambda"] + [m[0] for m in METRICS] + ["raw_feature_spread", "seconds"]
    new_file = not runs_path.is_file()
    handle = open(runs_path, "a", newline="")
    writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
    if new_file:
        writer.writeheader()
    started, source_rows, model_paths = time.time(), [], {}
    for backend in args.backends:
        arm = prepare_backend(backend, args, device, oracle, clip)
        source_rows.append(arm.source_row)
        model_paths[backend] = arm.model_path
        run_backend(backend, arm, args, oracle, clip, done, writer, handle, started, out)
        del arm
    handle.close()

    rows = [dict(r) for r in done.values()]
    for r in rows:
        r["lambda"], r["seed"] = float(r["lambda"]), int(r["seed"])
    comparison = [r for r in rows if r["lambda"] == args.lambda_domain and r["target"] in args.targets and r["backend"] in args.backends]
    sweep = [
        r for r in rows
        if r["target"] == args.targets[0] and r["scheme"] == "adaptive" and r["backend"] in args.backends
        and r["lambda"] in [float(v) for v in args.lambdas]
    ]
    text, table_rows = write_table(comparison, out / "table.md", out / "table.csv", f"Prompt schemes (λ = {args.lambda_domain:g})", source_rows)
    sweep_text = ""
    if sweep:
        sweep_text, _ = write_table(sweep, out / "lambda_sweep.md", None, f"λ sweep (adaptive, {args.targets[0]})")
    config = dict(vars(args), models=model_paths, device=device, torch_threads=torch.get_num_threads(), source_rows=source_rows)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    print(text)
    print(sweep_text)
    write_plots(out, args, table_rows, sweep)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
