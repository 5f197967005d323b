"""HED edge detector (Xie & Tu, ICCV 2015) in the layout of ``sniklaus/pytorch-hed``.

SCS in RSSA (and the AIR re-implementation built on IPL) detects edges with sniklaus' PyTorch
port of HED's BSDS500 model (``network-bsds500.pytorch``). The module names here are that port's
(``netVggOne`` ... ``netCombine``); its published file uses the older prefix ``module``
(``moduleVggOne.0.weight``), which :meth:`HED.from_pretrained` renames as the port itself does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .weights import NetworkSpec, load_into, load_state_dict, resolve_weights

HED_SPEC = NetworkSpec(
    name="HED edge detector (sniklaus/pytorch-hed BSDS500 layout)",
    default_filename="network-bsds500.pytorch",
    how_to_supply="hed_weights=PATH, or `ipl evaluate --hed-weights PATH`",
)

# Caffe VGG means, in BGR order, on the 0-255 scale (HED was trained in Caffe on BGR images).
_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)


def _vgg_stage(in_channels, out_channels, n_convs, pool):
    layers = [nn.MaxPool2d(kernel_size=2, stride=2)] if pool else []
    for i in range(n_convs):
        layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, 1, 1), nn.ReLU()]
    return nn.Sequential(*layers)


class HED(nn.Module):
    """``(B, 3, H, W)`` RGB in ``[-1, 1]`` -> ``(B, 1, H, W)`` edge probabilities in ``(0, 1)``."""

    def __init__(self):
        super().__init__()
        self.netVggOne = _vgg_stage(3, 64, 2, pool=False)
        self.netVggTwo = _vgg_stage(64, 128, 2, pool=True)
        self.netVggThr = _vgg_stage(128, 256, 3, pool=True)
        self.netVggFou = _vgg_stage(256, 512, 3, pool=True)
        self.netVggFiv = _vgg_stage(512, 512, 3, pool=True)
        self.netScoreOne = nn.Conv2d(64, 1, 1)
        self.netScoreTwo = nn.Conv2d(128, 1, 1)
        self.netScoreThr = nn.Conv2d(256, 1, 1)
        self.netScoreFou = nn.Conv2d(512, 1, 1)
        self.netScoreFiv = nn.Conv2d(512, 1, 1)
        self.netCombine = nn.Sequential(nn.Conv2d(5, 1, 1), nn.Sigmoid())
        self.register_buffer("bgr_mean", torch.tensor(_BGR_MEAN).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # RGB [-1, 1] -> BGR [0, 255] minus the Caffe mean (the port reads BGR images / 255, then * 255).
        x = (images.flip(1) + 1) * 127.5 - self.bgr_mean
        size = x.shape[2:]
        feats, scores = x, []
        for stage, score in zip(
            (self.netVggOne, self.netVggTwo, self.netVggThr, self.netVggFou, self.netVggFiv),
            (self.netScoreOne, self.netScoreTwo, self.netScoreThr, self.netScoreFou, self.netScoreFiv),
        ):
            feats = stage(feats)
            scores.append(F.interpolate(score(feats), size=size, mode="bilinear", align_corners=False))
        return self.netCombine(torch.cat(scores, 1))

    @classmethod
    def from_pretrained(cls, weights, metric: str = "SCS"):
        path = resolve_weights(weights, HED_SPEC, metric)
        state = {key.replace("module", "net", 1): value for key, value in load_state_dict(path).items()}
        model = cls()
        load_into(model, state, HED_SPEC, str(path))
        return model.eval().requires_grad_(False)
