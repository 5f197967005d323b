"""The Shapes oracle: a small CNN that reads the ground-truth factors back from an image.

Used **only to evaluate** adaptations (benchmarks/shapes_collapse.py), never to train one:
it tells which style an adapted image is in (target-style accuracy), whether the object kept
its shape, colour, position and size (per-image factor preservation, our analogue of the
paper's SCS / ID similarity), and its penultimate features give a diversity measure (mean
pairwise feature distance, cf. IPL §4.2's intra-LPIPS argument about mode collapse).

Input: images ``float32 (B, 3, H, W)`` in ``[-1, 1]`` at the oracle's ``resolution``.
Two coordinate channels are appended (CoordConv) and the last feature map is flattened
rather than pooled, so the network can regress absolute position.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .renderer import COLORS, SHAPES, STYLES


def _block(cin, cout, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.SiLU(),
    )


class ShapesOracle(ModelMixin, ConfigMixin):
    """Classifier / regressor of the Shapes factors.

    Args:
        resolution: input side in pixels (a multiple of 8).
        channels: channels of the three conv stages (each halves the resolution after the first).
        feature_dim: size of the penultimate feature vector (used for diversity).
        styles, shapes, colors: class names, stored in the config so predictions can be named.

    ``forward(images)`` returns a dict of
    ``style``/``shape``/``color`` logits ``(B, n_classes)``, ``position`` ``(B, 2)`` (object centre
    ``(x, y)`` in units of the image side), ``size`` ``(B,)`` (half extent in units of the image
    side) and ``features`` ``(B, feature_dim)``. Raises ``ValueError`` for a wrong input shape.
    """

    @register_to_config
    def __init__(
        self,
        resolution=32,
        channels=(16, 32, 64),
        feature_dim=128,
        styles=STYLES,
        shapes=SHAPES,
        colors=COLORS,
    ):
        super().__init__()
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}.")
        c1, c2, c3 = channels
        self.stages = nn.Sequential(_block(5, c1, 1), _block(c1, c2, 2), _block(c2, c3, 2), _block(c3, c3, 2))
        side = resolution // 8
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(c3 * side * side, feature_dim), nn.SiLU())
        self.style_head = nn.Linear(feature_dim, len(styles))
        self.shape_head = nn.Linear(feature_dim, len(shapes))
        self.color_head = nn.Linear(feature_dim, len(colors))
        self.geometry_head = nn.Linear(feature_dim, 3)  # x, y, size

    def forward(self, images):
        res = self.config.resolution
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (res, res):
            raise ValueError(f"ShapesOracle expects images (B, 3, {res}, {res}) in [-1, 1], got {tuple(images.shape)}.")
        b = images.shape[0]
        coords = torch.linspace(-1, 1, res, device=images.device, dtype=images.dtype)
        ys, xs = torch.meshgrid(coords, coords, indexing="ij")
        grid = torch.stack([xs, ys]).unsqueeze(0).expand(b, 2, res, res)
        features = self.project(self.stages(torch.cat([images, grid], dim=1)))
        geometry = self.geometry_head(features)
        return dict(
            style=self.style_head(features),
            shape=self.shape_head(features),
            color=self.color_head(features),
            # Offsets around the renderer's mid-range values keep the regression well conditioned.
            position=0.5 + 0.25 * geometry[:, :2],
            size=0.21 + 0.1 * geometry[:, 2],
            features=features,
        )

    @torch.no_grad()
    def predict(self, images, batch_size=256):
        """Predicted factors of ``images``: dict of int64 ``style``/``shape``/``color`` ``(B,)``,
        float ``position (B, 2)``, ``size (B,)``, ``features (B, feature_dim)`` and the class
        probabilities ``{name}_probs``. Images of another size are resized (bilinear)."""
        res = self.config.resolution
        outputs = []
        for chunk in images.split(batch_size):
            chunk = chunk.to(self.device, self.dtype)
            if chunk.shape[-2:] != (res, res):
                chunk = F.interpolate(chunk, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
            outputs.append(self(chunk))
        out = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
        result = dict(position=out["position"], size=out["size"], features=out["features"])
        for key in ("style", "shape", "color"):
            result[key] = out[key].argmax(1)
            result[f"{key}_probs"] = out[key].softmax(1)
        return result


def label_entropy(labels: torch.Tensor, num_classes: int) -> float:
    """Entropy (nats) of the empirical distribution of the oracle's int labels ``(N,)`` over
    ``num_classes`` classes: ``log(num_classes)`` when every class is equally frequent, 0 for
    one class. How the benchmark and the training records measure factor diversity."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    p = counts / counts.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def oracle_loss(outputs, factors):
    """Training loss of the oracle: cross-entropy on the three classes, L1 on position and size
    (in units of the image side, scaled by 10 so that a 1-pixel error at 32 px weighs ~0.3)."""
    ce = sum(F.cross_entropy(outputs[k], getattr(factors, k).to(outputs[k].device)) for k in ("style", "shape", "color"))
    position = F.l1_loss(outputs["position"], factors.position.to(outputs["position"].device))
    size = F.l1_loss(outputs["size"], factors.size.to(outputs["size"].device))
    return ce + 10 * (position + size)
