#!/usr/bin/env python
"""Image-space check of a Shapes world's CLIP: does a text direction reward drifting
towards the biased world's sketch content?

For 300 rendered photos that are neither circles nor red, compare the cosine of two image
directions with a text direction: photo -> the same object as a sketch ("keep content"), and
photo -> a red circle sketch at the same place ("biased content"). NADA's fixed direction and
the oracle's true-caption directions are printed per CLIP folder. A world whose label carries
content would give NADA a positive pull (biased content preferred) for some images.

    python benchmarks/shapes_worlds_pull.py ipl_diffusion/shapes_models/clip runs/clip_b0.9_p1_out
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shapes_worlds as sw  # noqa: E402
from ipl_diffusion.shapes import ShapesRenderer  # noqa: E402


def main(paths):
    torch.set_num_threads(1)
    renderer = ShapesRenderer(32)
    photos, factors = renderer.sample(300, seed=7, style="photo")
    keep = (factors.shape != 0) & (factors.color != 0)  # not already a circle, not already red
    sketches = renderer(factors.with_style("sketch"), seed=8)
    biased = factors.with_style("sketch")
    biased.shape, biased.color = torch.zeros_like(factors.shape), torch.zeros_like(factors.color)
    biased_sketches = renderer(biased, seed=8)
    for path in paths:
        encoder, image_features = sw.load_world_clip(path, "cpu")
        with torch.no_grad():
            e0, e1, e2 = [F.normalize(image_features(x), dim=-1) for x in (photos, sketches, biased_sketches)]
            nada = F.normalize(encoder.label_features("sketch") - encoder.label_features("photo"), dim=-1)
            table = sw.OracleCaptionPrompts(encoder)
            oracle = F.normalize(table.caption_table("sketch")[factors.shape, factors.color]
                                 - table.caption_table("photo")[factors.shape, factors.color], dim=-1)
        d_keep, d_bias = F.normalize(e1 - e0, dim=-1), F.normalize(e2 - e0, dim=-1)
        for name, dirs in (("NADA", nada.expand_as(d_keep)), ("oracle", oracle)):
            a, b = (d_keep * dirs).sum(-1)[keep], (d_bias * dirs).sum(-1)[keep]
            print(f"{path} {name}: cos(keep content) {a.mean():.3f}, cos(-> red circle sketch) {b.mean():.3f}, "
                  f"pull {(b - a).mean():+.3f}, images preferring the biased content {(b > a).float().mean():.2f}")


if __name__ == "__main__":
    main(sys.argv[1:] or [str(sw.default_model_path("clip"))])
