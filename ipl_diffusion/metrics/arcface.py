"""ArcFace IR-SE50 face-recognition backbone in the layout of TreB1eN/InsightFace_Pytorch.

This is the identity network of pSp / e4e / StyleCLIP / DiffusionCLIP (``model_ir_se50.pth``,
``Backbone(input_size=112, num_layers=50, drop_ratio=0.6, mode="ir_se")``), which IPL's ID
column follows (IPL issue #11). Module names match that file so it loads with ``strict=True``.
Output: L2-normalised ``(B, 512)`` embeddings of ``(B, 3, 112, 112)`` faces in ``[-1, 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .weights import NetworkSpec, load_into, load_state_dict, resolve_weights

ARCFACE_SPEC = NetworkSpec(
    name="ArcFace IR-SE50 (TreB1eN / pSp layout)",
    default_filename="model_ir_se50.pth",
    how_to_supply="arcface_weights=PATH, or `ipl evaluate --arcface-weights PATH`",
)


class SEModule(nn.Module):
    def __init__(self, channels, reduction=16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)

    def forward(self, x):
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * w


class BottleneckIRSE(nn.Module):
    """Pre-activation IR block with squeeze-excitation (``bottleneck_IR_SE`` upstream)."""

    def __init__(self, in_channels, depth, stride):
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)  # identity, subsampled
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, 1, stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, 16),
        )

    def forward(self, x):
        return self.res_layer(x) + self.shortcut_layer(x)


# (in_channels, depth, units) per stage of IR-50; the first unit of each stage has stride 2.
_IR50_STAGES = ((64, 64, 3), (64, 128, 4), (128, 256, 14), (256, 512, 3))


class IRSE50(nn.Module):
    """IR-SE50 ``Backbone`` for 112 x 112 inputs; ``stages`` may be shrunk for tests."""

    def __init__(self, stages=_IR50_STAGES, embedding_dim=512, drop_ratio=0.6):
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, stages[0][0], 3, 1, 1, bias=False), nn.BatchNorm2d(stages[0][0]), nn.PReLU(stages[0][0])
        )
        units = []
        for in_channels, depth, n in stages:
            units.append(BottleneckIRSE(in_channels, depth, 2))
            units += [BottleneckIRSE(depth, depth, 1) for _ in range(n - 1)]
        self.body = nn.Sequential(*units)
        final = stages[-1][1]
        spatial = 112 // 2 ** len(stages)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(final),
            nn.Dropout(drop_ratio),
            nn.Flatten(),
            nn.Linear(final * spatial * spatial, embedding_dim),
            nn.BatchNorm1d(embedding_dim, affine=True),
        )
        self.eval().requires_grad_(False)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.output_layer(self.body(self.input_layer(faces))), dim=1)

    @classmethod
    def from_pretrained(cls, weights, metric: str = "ID"):
        path = resolve_weights(weights, ARCFACE_SPEC, metric)
        model = cls()
        load_into(model, load_state_dict(path), ARCFACE_SPEC, str(path))
        return model.eval().requires_grad_(False)
