"""Inception-v3 in torchvision's state-dict layout, plus the FID variant of pytorch-fid.

torchvision cannot be imported beside the torch builds this project supports, so the network
is defined here, module for module, with torchvision's parameter names. That makes the
published weight files load with ``strict=True``:

* ``variant="torchvision"``: torchvision's ImageNet Inception-v3 (``inception_v3_google-*.pth``,
  1000 classes, with the ``AuxLogits`` head). Used by the Inception Score as computed by
  ``sbarratt/inception-score-pytorch`` and RSSA, and by SinGAN's SIFID (``SIFID/inception.py``
  wraps ``torchvision.models.inception_v3(pretrained=True)``).
* ``variant="fid"``: the TensorFlow FID Inception ported by pytorch-fid
  (``pt_inception-2015-12-05-6726825d.pth``, 1008 classes, no aux head). It differs from the
  torchvision network in its pooling: average pools that exclude padding in Mixed_5b-5d,
  Mixed_6b-6e and Mixed_7b, and a max pool in Mixed_7c's pool branch.

Both expect inputs in ``[-1, 1]`` (the Google weights were trained on that range); no
``transform_input`` re-normalisation is applied (IS and SIFID call the network without it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .weights import NetworkSpec, load_into, load_state_dict, resolve_weights

TORCHVISION_SPEC = NetworkSpec(
    name="Inception-v3 (torchvision ImageNet layout)",
    default_filename="inception_v3_google-0cc3c7bd.pth",
    how_to_supply="inception_weights=PATH, or `ipl evaluate --inception-weights PATH`",
)
FID_SPEC = NetworkSpec(
    name="FID Inception-v3 (pytorch-fid layout)",
    default_filename="pt_inception-2015-12-05-6726825d.pth",
    how_to_supply="fid_inception_weights=PATH, or `ipl evaluate --fid-inception-weights PATH`",
)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as in the TF port) -> ReLU."""

    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x, fid):
    # The FID port averages over valid pixels only (TF's "SAME" pooling); torchvision counts padding.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=not fid)


class InceptionA(nn.Module):
    def __init__(self, in_channels, pool_features, fid=False):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool(x, self.fid))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels, channels_7x7, fid=False):
        super().__init__()
        self.fid = fid
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            dbl = layer(dbl)
        branch_pool = self.branch_pool(_avg_pool(x, self.fid))
        return torch.cat([self.branch1x1(x), branch7x7, dbl, branch_pool], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool="avg"``: torchvision; ``"avg_valid"``: FID Mixed_7b; ``"max"``: FID Mixed_7c."""

    def __init__(self, in_channels, pool="avg"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool(x, fid=self.pool == "avg_valid")
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class InceptionAux(nn.Module):
    """Training-time auxiliary head; kept only so torchvision's file loads with ``strict=True``."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.conv0 = BasicConv2d(in_channels, 128, kernel_size=1)
        self.conv1 = BasicConv2d(128, 768, kernel_size=5)
        self.fc = nn.Linear(768, num_classes)


class InceptionV3(nn.Module):
    """Inception-v3 with torchvision's module names.

    Args:
        variant: ``"torchvision"`` (ImageNet classifier, 1000 classes, aux head) or ``"fid"``
            (pytorch-fid's port of the TF FID graph, 1008 classes, no aux head).

    Input to every method: ``(B, 3, H, W)`` float in ``[-1, 1]``; H, W >= 75. No resizing is
    done here: each metric resizes (or not) exactly as its reference does.
    """

    def __init__(self, variant: str = "torchvision"):
        super().__init__()
        if variant not in ("torchvision", "fid"):
            raise ValueError(f"variant must be 'torchvision' or 'fid', got {variant!r}")
        self.variant = variant
        fid = variant == "fid"
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32, fid=fid)
        self.Mixed_5c = InceptionA(256, pool_features=64, fid=fid)
        self.Mixed_5d = InceptionA(288, pool_features=64, fid=fid)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, fid=fid)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, fid=fid)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, fid=fid)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, fid=fid)
        if not fid:
            self.AuxLogits = InceptionAux(768, 1000)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg_valid" if fid else "avg")
        self.Mixed_7c = InceptionE(2048, pool="max" if fid else "avg")
        self.fc = nn.Linear(2048, 1008 if fid else 1000)
        self.eval().requires_grad_(False)

    def block0(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 64, H', W')``: Conv2d_1a, 2a, 2b, *before* the first max pool.

        This is SinGAN's ``InceptionV3`` output block 0 (dims=64) used by SIFID.
        """
        return self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))

    def block1(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 192, H'', W'')``: first max pool, Conv2d_3b, Conv2d_4a (before the second max pool).

        SinGAN's output block 1 (dims=192), the layer the SinGAN paper's text describes.
        """
        x = F.max_pool2d(self.block0(x), kernel_size=3, stride=2)
        return self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 2048)``: the global average pool before ``fc`` (FID / KID features)."""
        x = F.max_pool2d(self.block1(x), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, num_classes)`` classifier logits (dropout is a no-op in eval)."""
        return self.fc(self.pool_features(x))

    forward = logits

    @classmethod
    def from_pretrained(cls, weights, variant: str = "torchvision", metric: str = "Inception metrics"):
        """Build the network and load ``weights`` (file, folder or Hub id, see ``metrics.weights``).

        Raises:
            ValueError: no weights given, or a file in another layout (names the missing keys).
            FileNotFoundError: the file / Hub entry does not exist locally.
        """
        spec = FID_SPEC if variant == "fid" else TORCHVISION_SPEC
        path = resolve_weights(weights, spec, metric)
        model = cls(variant)
        load_into(model, load_state_dict(path), spec, str(path))
        return model.eval().requires_grad_(False)
