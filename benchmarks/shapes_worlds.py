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
  caption templates, as NADA averages templates), the factors read from ``G_s(w)`` by the
  evaluation oracle (a generated image has no renderer ground truth). Not a library scheme;
* ``adaptive`` -- IPL's Stage 1 mapper (Eq. 6), as ``ipl adapt`` runs it.

**The gate.** A world can decide the question only if the oracle's per-image directions beat
NADA's fixed one on factor preservation / diversity at matched target accuracy, with 95%
intervals (paired over seeds) that exclude 0. A world that fails the gate is not evidence
about IPL either way.

**Matched stylisation.** Every run is one GAN-IPL Stage 2 (``GANIPLTrainer``, the shipped
settings unless overridden) whose EMA generator is scored at several iterations
(``--milestones``; Adam at a constant lr, so the prefix of a run *is* a shorter run). Each
seed's curve (target accuracy vs shape kept, colour kept, entropies, ...) is interpolated at
``--match_acc`` target accuracies, and schemes are compared there, seed by seed.

**Diagnostics** (per world, scheme and seed, on 256 held-out ``w``): Stage-1 held-out
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
from ipl_diffusion.shapes import COLORS, SHAPES, STYLES, default_model_path  # noqa: E402
from ipl_diffusion.shapes.vocab import CAPTION_TEMPLATES  # noqa: E402
from ipl_diffusion.shapes.worlds import DEFAULT_STYLE_BIAS  # noqa: E402

import shapes_collapse as sc  # noqa: E402  (the oracle metrics and the grid, shared)

SCHEMES = ("manual", "oracle", "adaptive", "learned", "random")
SCHEME_NAMES = {"manual": "manual (NADA)", "oracle": "oracle (true captions)", "adaptive": "adaptive (IPL)",
                "learned": "learned (one learned prompt)", "random": "random prompts"}
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
GATE_METRICS = ("shape_acc", "color_acc", "shape_prob_kept", "color_prob_kept", "shape_entropy", "color_entropy")
MIN_GATE_SEEDS = 5
# Directed drift (reported, not part of the gate): the share of images that did not show the
# biased world's content for the target (DEFAULT_STYLE_BIAS) and now do. A label that carries
# content should pull NADA's images there.
DRIFT_METRICS = (("drift_to_bias_shape", "→ biased shape"), ("drift_to_bias_color", "→ biased colour"))
FULL_CAPTIONS = CAPTION_TEMPLATES[("style", "color", "shape")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", nargs="+", default=None,
                   help="NAME=CLIP_FOLDER pairs (default: control = the shipped Shapes CLIP)")
    p.add_argument("--gan_model", default=None, help="source StyleGANIPLPipeline folder (default: the shipped Shapes GAN)")
    p.add_argument("--oracle", default=None, help="evaluation oracle folder (default: the shipped one); the same in every world")
    p.add_argument("--output_dir", default="benchmarks/results/shapes_worlds")
    p.add_argument("--target", default="sketch")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--learning_rates", nargs="+", type=float, default=[0.001], help="Stage 2 lr (shipped: 0.001)")
    p.add_argument("--milestones", nargs="+", type=int, default=[10, 20, 30, 45, 60, 80, 100, 130, 160, 200, 250],
                   help="iterations at which the EMA generator is scored (the last is the run's length)")
    p.add_argument("--batch_size", type=int, default=4, help="Stage 2 batch (shipped 4)")
    p.add_argument("--stage1_iterations", type=int, default=300, help="adaptive Stage 1 iterations (shipped 300)")
    p.add_argument("--stage1_batch_size", type=int, default=32)
    p.add_argument("--lambda_domain", type=float, default=1.0)
    p.add_argument("--eval_images", type=int, default=32)
    p.add_argument("--diag_latents", type=int, default=256)
    p.add_argument("--truncation", type=float, default=0.7)
    p.add_argument("--match_acc", nargs="+", type=float, default=[0.5, 0.8])
    p.add_argument("--images_dir", default=str(REPO / "runs" / "shapes_worlds_images"),
                   help="every milestone's evaluated images (uint8 safetensors; not committed), for re-scoring with another oracle")
    p.add_argument("--rescore_from", default=None,
                   help="an earlier output folder: score its saved images (--images_dir) with --oracle instead of "
                   "adapting again (same runs, another evaluation oracle; its rows get their own key)")
    p.add_argument("--tables_only", action="store_true", help="regenerate tables / plots from runs.csv, run nothing")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 seed, tiny budgets, output under runs/")
    args = p.parse_args(argv)
    if args.worlds is None:
        args.worlds = [f"control={default_model_path('clip')}"]
    if args.quick:
        args.seeds = args.seeds[:1]
        args.milestones = [2, 4]
        args.stage1_iterations, args.eval_images, args.diag_latents = 5, 8, 16
        # --quick never writes into the committed results folder: there it goes under runs/.
        results = (REPO / "benchmarks" / "results").resolve()
        if Path(args.output_dir).resolve().is_relative_to(results):
            args.output_dir = str(REPO / "runs" / "shapes_worlds_quick")
        args.images_dir = str(Path(args.output_dir) / "images")
    args.milestones = sorted(set(args.milestones))
    return args


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
    (``digests``), per run.
    """
    settings = {k: getattr(args, k) for k in (
        "target", "milestones", "batch_size", "stage1_iterations", "stage1_batch_size", "lambda_domain",
        "eval_images", "diag_latents", "truncation")}
    blob = json.dumps({"settings": settings, "models": digests}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ the oracle scheme


class OracleCaptionPrompts:
    """Benchmark-only prompt scheme: each image's *true* caption features.

    ``text_features(w (B, style_dim), label) -> (B, D)``: reads shape and colour of
    ``G_s(w)`` (fixed noise) with the evaluation oracle and returns the mean of the unit CLIP
    text features of the full captions "a {label} of a {colour} {shape}" (the vocabulary's
    templates), the same form as NADA's template-averaged label features. Features of the
    6 x 6 contents are computed once per label.
    """

    def __init__(self, encoder, source_generator, oracle):
        self.encoder, self.source_generator, self.oracle = encoder, source_generator, oracle
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
    def read_content(self, w):
        images, _ = self.source_generator([w], input_is_latent=True, randomize_noise=False)
        pred = self.oracle.predict(images)
        return pred["shape"].cpu(), pred["color"].cpu()

    @torch.no_grad()
    def text_features(self, w, label, content=None):
        shape, color = content if content is not None else self.read_content(w)
        return self.caption_table(label)[shape, color].to(w.device)


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
    table = OracleCaptionPrompts(encoder, None, None)
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


def run_one(pipe, encoder, image_features, oracle, scheme, seed, lr, args, ev, diag):
    """One Stage 1 + Stage 2 run; yields ``(iteration, metrics, images)`` at each milestone
    after the run-level diagnostics (``iteration`` 0, images None)."""
    from ipl_diffusion.adaptation import stylegan2 as gan_ipl

    source_generator = pipe.source_generator
    target = args.target
    t0 = time.time()
    info = {}
    if scheme == "oracle":
        learner = OracleCaptionPrompts(encoder, source_generator, oracle)
        prompt_features = lambda w: (learner.text_features(w, "photo"), learner.text_features(w, target))  # noqa: E731
        src_d = learner.text_features(diag["w"], "photo", diag["content"])
        tgt_d = learner.text_features(diag["w"], target, diag["content"])
        info["stage1_heldout_retrieval"] = float("nan")
    else:
        options = Stage1Config(scheme=scheme, lambda_domain=args.lambda_domain, stage1_iterations=args.stage1_iterations,
                               stage1_batch_size=args.stage1_batch_size, n_ctx=4, label_templates="imagenet")
        learner = gan_ipl.run_stage1(source_generator, encoder, image_features, "photo", target, options, seed, False)
        prompt_features = lambda w: (learner.text_features(w, "photo"), learner.text_features(w, target))  # noqa: E731
        with torch.no_grad():
            src_d, tgt_d = prompt_features(diag["w"])
        info["stage1_heldout_retrieval"] = float(learner.heldout_retrieval) if learner.heldout_retrieval is not None else float("nan")
    info.update(direction_diagnostics(src_d, tgt_d, diag["c"]))
    info["stage1_seconds"] = time.time() - t0
    yield 0, info, None

    config = GANStage2Config(iterations=args.milestones[-1], batch_size=args.batch_size, learning_rate=lr, seed=seed)
    with torch.no_grad():
        target_text = encoder.encode_text([target])[0]
    trainer = gan_ipl.GANIPLTrainer(source_generator, prompt_features, image_features, target_text, config)
    t1 = time.time()
    while trainer.step < config.iterations:
        trainer.train_step()
        if trainer.step in args.milestones:
            images = render(trainer.generator_ema, ev["w"], ev["mean_w"], args.truncation)
            metrics = score(oracle, images, ev, target)
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
                for scheme in args.schemes:
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
                    lines.append(f"| {world} | {lr:g} | {acc:g} | {SCHEME_NAMES[scheme]} | {record['seeds_reaching']} | " + " | ".join(cells) + " |")
    return lines, table


def compare_to_manual(base, other, record):
    """Fill ``record`` with the seed-paired differences other - manual per metric; returns the
    table cells and, per gate metric with >= 2 pairs, whether its interval is above 0."""
    cells, passes = [], []
    for key, _, _ in CURVE_METRICS:
        diffs = [other[key][s] - base[key][s] for s in base[key]
                 if s in other[key] and base[key][s] is not None and other[key][s] is not None]
        mean, half, n = summarise(diffs)
        record[key], record[key + "_ci95"], record[key + "_n"] = mean, half, n
        if n >= 2 and key in GATE_METRICS:
            passes.append(mean - half > 0)
        cells.append("–" if n == 0 else f"{mean:+.3f} ± {half:.3f} (n={n})")
    return cells, passes


def gate_verdict(record, passes):
    """PASS, fail or undecided for one comparison's paired differences."""
    # The gate (oracle only): better on at least one preservation / diversity
    # metric with the interval above 0, and significantly worse on none.
    worse = any(record.get(k + "_n", 0) >= 2 and record[k] + record[k + "_ci95"] < 0 for k in GATE_METRICS)
    verdict = "PASS" if any(passes) and not worse else "fail"
    # Issue 18 asks for at least 5 seeds: fewer seeds reaching the matched
    # accuracy cannot decide, whichever way their interval falls.
    if min(record.get(k + "_n", 0) for k in GATE_METRICS) < MIN_GATE_SEEDS:
        verdict = f"undecided (< {MIN_GATE_SEEDS} seeds reach it)"
    return verdict


def paired_differences(matched, worlds, lrs, args):
    """Markdown lines and ``differences.csv`` records of oracle / adaptive minus manual, with the gate."""
    lines = ["", "### Paired differences at matched target accuracy (seed by seed; 95% t-interval)", "",
             "| world | lr | target acc | comparison | " + " | ".join(label for _, label, _ in CURVE_METRICS) + " | gate |",
             "|" + "---|" * (5 + len(CURVE_METRICS))]
    gates = []
    for world in worlds:
        for lr in lrs:
            for acc in args.match_acc:
                base = matched.get((world, "manual", lr, acc))
                for scheme in SCHEMES[1:]:
                    other = matched.get((world, scheme, lr, acc))
                    if not base or not other:
                        continue
                    record = dict(world=world, lr=lr, match_acc=acc, comparison=f"{scheme} - manual")
                    cells, passes = compare_to_manual(base, other, record)
                    verdict = gate_verdict(record, passes)
                    record["gate"] = verdict if scheme == "oracle" else ""
                    gates.append(record)
                    lines.append(f"| {world} | {lr:g} | {acc:g} | {record['comparison']} | " + " | ".join(cells) + f" | {record['gate'] or '–'} |")
    return lines, gates


def analyse(rows, args, source_metrics, out):
    """Tables of values at matched target accuracy and the gate, from runs.csv rows."""
    matched = matched_values(rows, args, source_metrics)
    worlds = sorted({k[0] for k in matched}, key=lambda w: (w != "control", w))
    lrs = sorted({k[2] for k in matched})
    lines, table = matched_table(matched, worlds, lrs, args)
    difference_lines, gates = paired_differences(matched, worlds, lrs, args)
    text = "\n".join(lines + difference_lines) + "\n"
    (out / "matched.md").write_text(text)
    for name, recs in (("matched.csv", table), ("differences.csv", gates)):
        if recs:
            write_csv(out / name, recs)
    return text


def write_curves(rows, args, out):
    """``curves.csv`` / ``curves.md``: per world, scheme, lr and milestone, the mean over seeds
    of target accuracy and every curve metric (the curves the matched values are read from)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["world"], r["scheme"], float(r["lr"]), int(r["iteration"])), []).append(r)
    records = []
    for (world, scheme, lr, iteration), members in sorted(groups.items(), key=lambda kv: (kv[0][0] != "control", kv[0])):
        record = dict(world=world, scheme=scheme, lr=lr, iteration=iteration, seeds=len(members))
        for key in ["target_acc"] + [k for k, _, _ in CURVE_METRICS]:
            values = [float(m[key]) for m in members if m.get(key) not in (None, "") and float(m[key]) == float(m[key])]
            record[key] = sum(values) / len(values) if values else float("nan")
        records.append(record)
    if not records:
        return
    with open(out / "curves.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    lines = ["| world | scheme | lr | iteration | seeds | target acc | " + " | ".join(l for _, l, _ in CURVE_METRICS) + " |",
             "|" + "---|" * (6 + len(CURVE_METRICS))]
    for r in records:
        lines.append(f"| {r['world']} | {SCHEME_NAMES[r['scheme']]} | {r['lr']:g} | {r['iteration']} | {r['seeds']} | {r['target_acc']:.3f} | "
                     + " | ".join(f"{r[k]:.3f}" for k, _, _ in CURVE_METRICS) + " |")
    (out / "curves.md").write_text("### Curves (mean over seeds per milestone)\n\n" + "\n".join(lines) + "\n")


def curve_plots(rows, args, out):
    """Target accuracy (x) vs each preservation metric (y), mean over seeds per milestone."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    worlds = sorted({r["world"] for r in rows})
    for key, label, _ in CURVE_METRICS:
        fig, axes = plt.subplots(1, len(worlds), figsize=(4 * len(worlds), 3.2), squeeze=False)
        for ax, world in zip(axes[0], worlds):
            for scheme in args.schemes:
                for lr in sorted({float(r["lr"]) for r in rows}):
                    pts = {}
                    for r in rows:
                        if r["world"] == world and r["scheme"] == scheme and float(r["lr"]) == lr and int(r["iteration"]) > 0:
                            pts.setdefault(int(r["iteration"]), []).append((float(r["target_acc"]), float(r[key])))
                    if not pts:
                        continue
                    its = sorted(pts)
                    xs = [sum(a for a, _ in pts[i]) / len(pts[i]) for i in its]
                    ys = [sum(v for _, v in pts[i]) / len(pts[i]) for i in its]
                    ax.plot(xs, ys, marker="o", ms=3, label=f"{SCHEME_NAMES[scheme]} lr {lr:g}")
            ax.set_title(f"{world}: {label}")
            ax.set_xlabel(f"target acc ({args.target})")
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "plots" / f"curve_{key}.png", dpi=100)
        plt.close(fig)


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
    pipe: object
    gan_path: object
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
    """Load the evaluation oracle and the source GAN; digest them and every world's CLIP."""
    from ipl_diffusion.shapes.oracle import ShapesOracle

    oracle_path = Path(args.oracle or default_model_path("oracle"))
    oracle = ShapesOracle.from_pretrained(str(oracle_path)).eval()
    pipe, gan_path = sc.load_source_pipeline("stylegan2", args.gan_model, device)
    digests = {"gan": folder_digest(Path(gan_path) / "source_generator"), "oracle": folder_digest(oracle_path)}
    world_digests = {name: folder_digest(path) for name, path in worlds.items()}
    return Models(oracle, oracle_path, pipe, gan_path, digests, world_digests)


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
    done = {(r["key"], r["world"], r["scheme"], float(r["lr"]), int(r["seed"])) for r in current if int(r["iteration"]) == last_milestone}
    return current, done


def evaluation_set(pipe, oracle, args):
    """The fixed evaluation set: source images ``ev_x``, the ``ev`` dict runs are scored against, and the source's metrics."""
    from types import SimpleNamespace

    # Fixed z of a stream no run trains on, and the source generator's images of them, read
    # by the oracle (a generated image has no renderer ground truth).
    z = torch.randn(args.eval_images, pipe.source_generator.style_dim, generator=torch.Generator().manual_seed(31337))
    mean_w = pipe.mean_latent()
    with torch.no_grad():
        ev_w = pipe.source_generator.get_latent(z)
    ev_x = render(pipe.source_generator, ev_w, mean_w, args.truncation)
    read = oracle.predict(ev_x)
    ev = dict(w=ev_w, mean_w=mean_w, factors=SimpleNamespace(shape=read["shape"], color=read["color"], position=read["position"], size=read["size"]))
    ev["spread"] = sc.mean_pairwise_distance(read["features"])
    return ev_x, ev, score(oracle, ev_x, ev, args.target)


def diagnostics_latents(pipe, n):
    """``n`` untruncated w (what Stage 1 / 2 train on) of another stream, for the direction diagnostics."""
    zd = torch.randn(n, pipe.source_generator.style_dim, generator=torch.Generator().manual_seed(4242))
    with torch.no_grad():
        return pipe.source_generator.get_latent(zd)


def write_config(args, out, models, keys, source_metrics):
    """``config.json``: every option, the model paths and digests, the run keys and the source's metrics."""
    config = dict(vars(args), gan_model=str(models.gan_path), oracle_path=str(models.oracle_path), model_digests=models.digests,
                  world_digests=models.world_digests, run_keys=keys, torch=torch.__version__, torch_threads=torch.get_num_threads(),
                  source_metrics=source_metrics)
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str))


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


def prepare_worlds(worlds, args, pipe, oracle, diag_w, device):
    """Load every world's CLIP; returns per world ``(encoder, image_features, diag)`` and its text-only diagnostics rows."""
    state, diag_rows = {}, []
    for world, clip_path in worlds.items():
        encoder, image_features = load_world_clip(clip_path, device)
        wd = world_diagnostics(encoder, args.target)
        diag_rows.append(dict(world=world, clip=str(clip_path), **wd))
        print(f"world {world}: {wd}", flush=True)
        probe = OracleCaptionPrompts(encoder, pipe.source_generator, oracle)
        content = probe.read_content(diag_w)
        state[world] = (encoder, image_features, dict(w=diag_w, content=content, c=content_features(encoder, *content)))
    return state, diag_rows


def record_run(writer, pipe, oracle, world_state, ident, args, ev):
    """One run, its rows written as its milestones are scored.

    Returns the run-level diagnostics, the last metrics, the uint8 images per milestone
    (for ``--images_dir``) and ``{iteration: (target_acc, first 12 images)}`` for the grids.
    """
    encoder, image_features, diag = world_state
    info, metrics, saved, grid = {}, None, {}, {}
    for iteration, metrics, images in run_one(pipe, encoder, image_features, oracle, ident["scheme"], ident["seed"], ident["lr"], args, ev, diag):
        if iteration == 0:
            info = metrics
            row = dict(ident, iteration=0, **info)
        else:
            row = dict(ident, iteration=iteration, **info, **metrics)
            saved[f"iteration_{iteration}"] = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            grid[iteration] = (metrics["target_acc"], images[:12])
        writer.write(row, flush=True)
    return info, metrics, saved, grid


def save_run_images(saved, folder, name):
    """Save one run's milestone images (uint8 safetensors) as ``folder/name``."""
    if not saved:
        return
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(saved, str(folder / name))


def run_all(args, worlds, state, keys, done, writer, pipe, oracle, ev, started):
    """Every run not yet done (progress timed from ``started``); returns the first seed's grid images per world and scheme."""
    grid_rows = {}
    # Seeds outermost, then worlds: an interrupted benchmark has paired seeds in every world.
    for lr in args.learning_rates:
        for seed in args.seeds:
            for world in worlds:
                for scheme in args.schemes:
                    if (keys[world], world, scheme, lr, seed) in done:
                        continue
                    ident = dict(key=keys[world], world=world, scheme=scheme, lr=lr, seed=seed)
                    info, metrics, saved, grid = record_run(writer, pipe, oracle, state[world], ident, args, ev)
                    if grid and seed == args.seeds[0] and lr == args.learning_rates[0]:
                        grid_rows.setdefault(world, {}).setdefault(scheme, {}).update(grid)
                    save_run_images(saved, Path(args.images_dir) / keys[world], run_images_name(world, scheme, lr, seed))
                    print(f"[{time.time() - started:6.0f}s] {world} {scheme} lr={lr:g} seed={seed}: "
                          f"acc {metrics['target_acc']:.2f} shape {metrics['shape_acc']:.2f} colour {metrics['color_acc']:.2f} "
                          f"align {info['content_alignment']:.3f} spread {info['dt_mean_pairwise_cos']:.3f}", flush=True)
    return grid_rows


def write_grids(grid_rows, ev_x, args, out):
    """Grid per world: the source row, then per scheme the first milestone at or above the
    highest matched accuracy (else the last), first seed."""
    for world, per_scheme in grid_rows.items():
        rows_img, labels = [ev_x[:12]], []
        for scheme in args.schemes:
            if scheme in per_scheme:
                its = sorted(per_scheme[scheme])
                pick = next((i for i in its if per_scheme[scheme][i][0] >= max(args.match_acc)), its[-1])
                rows_img.append(per_scheme[scheme][pick][1])
                labels.append(f"{scheme}@{pick} (acc {per_scheme[scheme][pick][0]:.2f})")
        stem = f"{world}_{args.target.replace(' ', '_')}"
        labelled_grid(rows_img, ["source G_s(z)", *labels]).save(out / "grids" / f"{stem}.png")
        (out / "grids" / f"{stem}.txt").write_text(
            f"rows: source G_s(z) (truncation {args.truncation}), " + ", ".join(labels) + " (scheme@iteration, first seed)\n")


def direction_diagnostics_lines(current, worlds, args):
    """Markdown lines of the per-run direction diagnostics, mean ± 95% interval over seeds."""
    lines = ["", "### Direction diagnostics (256 held-out w; mean ± 95% interval over seeds)", "",
             "| world | scheme | Stage-1 held-out retrieval | ΔT_i mean pairwise cos | ΔT residual / mean | content alignment |", "|---|---|---|---|---|---|"]
    for world in worlds:
        for scheme in args.schemes:
            sel = [r for r in current if r["world"] == world and r["scheme"] == scheme and int(r["iteration"]) == 0]
            if not sel:
                continue
            cells = []
            for k in ("stage1_heldout_retrieval", "dt_mean_pairwise_cos", "dt_residual_norm", "content_alignment"):
                mean, half, n = summarise([float(r[k]) for r in sel])
                cells.append("–" if n == 0 else f"{mean:.3f} ± {half:.3f}")
            lines.append(f"| {world} | {SCHEME_NAMES[scheme]} | " + " | ".join(cells) + " |")
    return lines


def write_tables(current, worlds, args, source_metrics, out):
    """matched.md (with the direction diagnostics), the curves and the plots, from the runs' rows."""
    curves_rows = [r for r in current if int(r["iteration"]) > 0]
    diag_summary = direction_diagnostics_lines(current, worlds, args)
    text = analyse(curves_rows, args, source_metrics, out) + "\n".join(diag_summary) + "\n"
    (out / "matched.md").write_text(text)
    write_curves(curves_rows, args, out)
    curve_plots(curves_rows, args, out)
    print(text)
    print(f"results in {out}")


def main(argv=None):
    """Run (or re-score) every missing run, then write the tables, curves, plots and grids."""
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    worlds = parse_worlds(args.worlds)
    if args.target not in STYLES[1:]:
        raise ValueError(f"unknown target {args.target!r}; choose from {', '.join(STYLES[1:])}")
    out = Path(args.output_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    device = "cpu"
    models = load_models(args, worlds, device)
    rescore = load_rescore_source(args, out)
    keys = world_run_keys(args, worlds, models, rescore)
    runs_path = out / "runs.csv"
    current, done = read_current_runs(runs_path, keys, args.milestones[-1])
    ev_x, ev, source_metrics = evaluation_set(models.pipe, models.oracle, args)
    diag_w = diagnostics_latents(models.pipe, args.diag_latents)
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
        writer = RunsWriter(runs_path, current)
        try:
            started = time.time()
            state, diag_rows = prepare_worlds(worlds, args, models.pipe, models.oracle, diag_w, device)
            grid_rows = run_all(args, worlds, state, keys, done, writer, models.pipe, models.oracle, ev, started)
            write_grids(grid_rows, ev_x, args, out)
        finally:
            writer.close()
        if diag_rows:
            write_csv(out / "world_diagnostics.csv", diag_rows)

    write_tables(current, worlds, args, source_metrics, out)


if __name__ == "__main__":
    main()
