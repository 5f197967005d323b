#!/usr/bin/env python
"""Image-space check of a Shapes world's CLIP: does a text direction reward drifting
towards the biased world's sketch content?

For 300 rendered photos that are neither circles nor red, compare the cosine of two image
directions with a text direction: photo -> the same object as a sketch ("keep content"),
photo -> a red circle sketch at the same place ("biased content"), and photo -> a red circle
photo at the same place ("content only"). NADA's fixed direction and
the oracle's true-caption directions are printed per CLIP folder. A world whose label carries
content would give NADA a positive pull (biased content preferred) for some images.

    python benchmarks/shapes_worlds_pull.py ipl_diffusion/shapes_models/clip runs/clip_b0.9_p1_out

With ``--output_dir`` the rows (one per CLIP: its training world from training_record.json,
zero-shot accuracy, the text-only sketch diagnostics and this pull) go to world_sweep.md/.csv.
"""

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shapes_worlds as sw  # noqa: E402
from ipl_diffusion.shapes import ShapesRenderer  # noqa: E402


def pull(encoder, image_features, scenes, planted=()):
    """Per direction (NADA's, the oracle's true-caption ones, and NADA's with the world's biased
    content planted at each ALPHA of ``planted``, the benchmark's ``content@ALPHA``): mean cos
    with photo -> same object as a sketch, with photo -> red circle sketch, the share preferring
    the latter, and the mean cos with photo -> red circle photo (content only)."""
    photos, factors, keep, sketches, biased_sketches, biased_photos = scenes
    with torch.no_grad():
        e0, e1, e2, e3 = [F.normalize(image_features(x), dim=-1) for x in (photos, sketches, biased_sketches, biased_photos)]
        nada = F.normalize(encoder.label_features("sketch") - encoder.label_features("photo"), dim=-1)
        table = sw.OracleCaptionPrompts(encoder)
        oracle = F.normalize(table.caption_table("sketch")[factors.shape, factors.color]
                             - table.caption_table("photo")[factors.shape, factors.color], dim=-1)
        if planted:  # as sw.PlantedContent builds it from the label features
            tgt, src = (F.normalize(encoder.label_features(label).float(), dim=-1) for label in ("sketch", "photo"))
            content = sw.biased_content_direction(encoder, "sketch")
    d_keep, d_bias = F.normalize(e1 - e0, dim=-1), F.normalize(e2 - e0, dim=-1)
    # A change of content alone (the photo -> a red circle photo at the same place): what a
    # direction rewards before any style appears, where the adaptation starts.
    d_content = F.normalize(e3 - e0, dim=-1)
    directions = [("nada", nada.expand_as(d_keep)), ("oracle", oracle)]
    for alpha in planted:
        planted_tgt = sw.planted_target(tgt, src, content, alpha)
        directions.append((f"content@{alpha:g}", F.normalize(planted_tgt - src, dim=-1).expand_as(d_keep)))
    result = {}
    for name, dirs in directions:
        a, b, c = [(d * dirs).sum(-1)[keep] for d in (d_keep, d_bias, d_content)]
        result.update({f"{name}_cos_keep": float(a.mean()), f"{name}_cos_biased": float(b.mean()),
                       f"{name}_prefer_biased": float((b > a).float().mean()), f"{name}_cos_content": float(c.mean())})
    return result


def render_scenes():
    """300 photos, the keep mask (neither circle nor red), their sketches, red-circle sketches
    and red-circle photos (each red circle at its photo's place and size)."""
    renderer = ShapesRenderer(32)
    photos, factors = renderer.sample(300, seed=7, style="photo")
    keep = (factors.shape != 0) & (factors.color != 0)  # not already a circle, not already red
    sketches = renderer(factors.with_style("sketch"), seed=8)
    biased = factors.with_style("sketch")
    biased.shape, biased.color = torch.zeros_like(factors.shape), torch.zeros_like(factors.color)
    return photos, factors, keep, sketches, renderer(biased, seed=8), renderer(biased.with_style("photo"), seed=7)


RECORD_COLUMNS = ("bias", "paired_loss_weight", "style_only_prob", "faint_style_prob", "reporting_bias", "usual_content_photo_prob",
                  "usual_content_styles", "lock_image_tower", "zero_shot_style", "zero_shot_color", "zero_shot_shape")
# A folder without training_record.json: its world is not known, and is not shown as the balanced one.
UNKNOWN_WORLD = dict.fromkeys(RECORD_COLUMNS, "?")


def record_columns(record):
    """The world and zero-shot columns of a ``train_clip.py`` training record. A record from before
    an option existed was trained without it (0 / off)."""
    world = record.get("world") or {}
    zero_shot = record.get("zero_shot_accuracy") or {}
    columns = {name: world.get(name, 0.0) for name in RECORD_COLUMNS[:6]}
    columns.update(usual_content_styles=" ".join(world.get("usual_content_styles") or []) or "-",
                   lock_image_tower="yes" if world.get("lock_image_tower") else "no",
                   **{f"zero_shot_{k}": zero_shot.get(k, float("nan")) for k in ("style", "color", "shape")})
    return columns


def world_row(path, scenes, planted=()):
    """One CLIP folder: its training world and zero-shot accuracy (training_record.json), the
    text-only sketch diagnostics and the image-space pull."""
    record_file = Path(path) / "training_record.json"
    encoder, image_features = sw.load_world_clip(path, "cpu")
    row = dict(clip=str(path), **(record_columns(json.loads(record_file.read_text())) if record_file.is_file() else UNKNOWN_WORLD))
    row.update(sw.world_diagnostics(encoder, "sketch"))
    row.update(pull(encoder, image_features, scenes, planted))
    return row


COLUMNS = (("bias", "bias"), ("paired_loss_weight", "paired loss"), ("style_only_prob", "style-only captions"),
           ("faint_style_prob", "faint styles"), ("reporting_bias", "reporting bias"),
           ("usual_content_photo_prob", "usual-content photos"), ("usual_content_styles", "… of styles"),
           ("lock_image_tower", "image tower locked"),
           ("zero_shot_style", "zero-shot style"), ("zero_shot_shape", "zero-shot shape"), ("nada_top_color", "NADA's top colour (cos)"),
           ("nada_top_shape", "NADA's top shape (cos)"), ("nada_cos_keep", "NADA: keep"), ("nada_cos_biased", "NADA: → red circle"),
           ("nada_prefer_biased", "NADA prefers biased"), ("nada_cos_content", "NADA: content only"),
           ("oracle_cos_keep", "oracle: keep"), ("oracle_cos_biased", "oracle: → red circle"),
           ("oracle_cos_content", "oracle: content only"))


def cell(row, key):
    """One table cell: a name with its cosine, a word as it is, a number to 3 decimals."""
    if key.startswith("nada_top_"):
        return f"{row[key]} ({row[key + '_cos']:.3f})"
    return row[key] if isinstance(row[key], str) else f"{float(row[key]):.3f}"


def shown_path(path):
    """A CLIP folder as the table names it: relative to the working directory where it lies
    inside it (the shipped one as ipl_diffusion/shapes_models/clip), else as given. The
    folder's name alone would not tell two CLIPs called ``clip`` apart."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def write_table(rows, out):
    """``world_sweep.csv`` and ``world_sweep.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "world_sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| CLIP | " + " | ".join(label for _, label in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        cells = [cell(r, k) for k, _ in COLUMNS]
        lines.append(f"| {shown_path(r['clip'])} | " + " | ".join(cells) + " |")
    (out / "world_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("clips", nargs="*", help="Shapes CLIP folders (default: the shipped one)")
    p.add_argument("--output_dir", default=None, help="write world_sweep.md / .csv here")
    p.add_argument("--planted", nargs="*", type=float, default=[],
                   help="also NADA's direction with the biased content planted at these ALPHA (shapes_worlds.py's "
                   "content@ALPHA, the detection control): what pull a detected drift corresponds to (csv / printed)")
    args = p.parse_args(argv)
    for folder in args.clips:
        if not (Path(folder) / "config.json").is_file() or not (Path(folder) / "model.safetensors").is_file():
            p.error(f"{folder}: not a CLIP folder (config.json and model.safetensors expected)")
    torch.set_num_threads(1)
    scenes = render_scenes()
    rows = [world_row(path, scenes, args.planted) for path in (args.clips or [str(sw.default_model_path("clip"))])]
    if args.output_dir:
        write_table(rows, Path(args.output_dir))
    for r in rows:
        if args.planted or not args.output_dir:
            print(r)


if __name__ == "__main__":
    main()
