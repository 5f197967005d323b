"""LPIPS (Zhang et al., CVPR 2018), version 0.1, with torchvision-layout backbones defined here.

The ``lpips`` package needs torchvision for its AlexNet / VGG16 backbones; torchvision does not
import beside this project's torch, so the two backbones are written out with torchvision's
``features.N`` indices and loaded from torchvision's own files (``alexnet-owt-7be5be79.pth``,
``vgg16-397923af.pth``; only the ``features.*`` tensors are used). The calibrated linear layers
are LPIPS' ``weights/v0.1/{alex,vgg}.pth`` (keys ``lin{k}.model.1.weight``); the copies that ship
inside the torchmetrics wheel are used when no file is given.

Distance for images ``x, y`` in ``[-1, 1]``: scale with LPIPS' ``ScalingLayer``, take the five
ReLU stages, unit-normalise each feature vector over channels (``eps = 1e-10``), and sum over
stages ``mean_{h,w} w_k . (f_x - f_y)^2``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ipl_diffusion.errors import UserError
from .inputs import as_rgb, check_signed_range
from .weights import NetworkSpec, load_into, load_state_dict, resolve_weights

BACKBONE_SPECS = {
    "alex": NetworkSpec(
        name="LPIPS AlexNet backbone (torchvision ImageNet layout)",
        default_filename="alexnet-owt-7be5be79.pth",
        how_to_supply="lpips_backbone_weights=PATH, or `ipl evaluate --lpips-backbone-weights PATH`",
    ),
    "vgg": NetworkSpec(
        name="LPIPS VGG16 backbone (torchvision ImageNet layout)",
        default_filename="vgg16-397923af.pth",
        how_to_supply="lpips_backbone_weights=PATH, or `ipl evaluate --lpips-backbone-weights PATH`",
    ),
}
LIN_SPECS = {
    net: NetworkSpec(
        name=f"LPIPS v0.1 linear layers ({net})",
        default_filename=f"{net}.pth",
        how_to_supply="lpips_lin_weights=PATH (LPIPS' weights/v0.1 file), or install torchmetrics, which ships them",
    )
    for net in ("alex", "vgg")
}

# (features.N layers, stage ends) in torchvision's numbering
_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
_STAGE_ENDS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}


def _alexnet_features():
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


def _vgg16_features():
    layers, in_channels = [], 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU()]
            in_channels = width
    return nn.Sequential(*layers)


class _NetLinLayer(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


def normalize_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """LPIPS' ``normalize_tensor``: divide each position's feature vector by its L2 norm (+ eps)."""
    return features / (features.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """``forward(x, y) -> (B,)`` LPIPS distances of paired images ``(B, 3, H, W)`` in ``[-1, 1]``.

    Grey ``(B, 1, H, W)`` images are repeated to RGB. With ``check_range`` (default) inputs
    outside ``[-1, 1]``, or a pair lying wholly in ``[0, 1]``, raise ``UserError``
    (:func:`~ipl_diffusion.metrics.inputs.check_signed_range`): LPIPS of ``[0, 1]`` images is
    silently about a third of the right value. Callers that guarantee the range themselves
    (``ipl evaluate``'s loader, projection's loss on unclamped generator outputs) switch it off.
    """

    def __init__(self, net: str = "alex", check_range: bool = True):
        super().__init__()
        self.check_range = check_range
        if net not in _CHANNELS:
            raise UserError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        self.net = net
        self.features = _alexnet_features() if net == "alex" else _vgg16_features()
        for k, channels in enumerate(_CHANNELS[net]):
            self.add_module(f"lin{k}", _NetLinLayer(channels))
        # LPIPS' ScalingLayer constants (ImageNet statistics expressed on the [-1, 1] scale).
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def stages(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, outs, start = (images - self.shift) / self.scale, [], 0
        for end in _STAGE_ENDS[self.net]:
            x = self.features[start:end](x)
            outs.append(x)
            start = end
        return outs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = as_rgb(x, "LPIPS x"), as_rgb(y, "LPIPS y")
        if self.check_range:
            check_signed_range("LPIPS", x, y)
        total = 0
        for k, (fx, fy) in enumerate(zip(self.stages(x), self.stages(y))):
            diff = (normalize_channels(fx) - normalize_channels(fy)).square()
            total = total + getattr(self, f"lin{k}").model(diff).mean(dim=(2, 3))
        return total.flatten()

    @classmethod
    def from_pretrained(cls, backbone_weights, lin_weights=None, net: str = "alex", metric: str = "LPIPS"):
        """Load the torchvision backbone file and LPIPS' linear layers (default: torchmetrics' copy).

        Raises:
            ValueError: no backbone weights given / a file in another layout.
            FileNotFoundError: a path or Hub entry that is not available locally.
        """
        model = cls(net)
        spec = BACKBONE_SPECS[model.net]
        path = resolve_weights(backbone_weights, spec, metric)
        backbone = {k[len("features."):]: v for k, v in load_state_dict(path).items() if k.startswith("features.")}
        load_into(model.features, backbone, spec, str(path))
        if lin_weights is None:
            lin_weights = _torchmetrics_lin_file(model.net)
            if lin_weights is None:
                raise UserError(LIN_SPECS[model.net].missing_message(metric))
        lin_path = resolve_weights(lin_weights, LIN_SPECS[model.net], metric)
        lins = {k: v for k, v in load_state_dict(lin_path).items() if k.startswith("lin")}
        lin_module = nn.ModuleDict({f"lin{k}": getattr(model, f"lin{k}") for k in range(5)})
        load_into(lin_module, lins, LIN_SPECS[model.net], str(lin_path))
        return model.eval().requires_grad_(False)


def _torchmetrics_lin_file(net: str):
    try:
        import torchmetrics.functional.image.lpips as tm_lpips
    except Exception:  # torchmetrics is optional, and its LPIPS module may refuse to import
        try:
            import torchmetrics
        except ImportError:
            return None
        base = Path(torchmetrics.__file__).parent / "functional" / "image"
    else:
        base = Path(tm_lpips.__file__).parent
    candidate = base / "lpips_models" / f"{net}.pth"
    return candidate if candidate.is_file() else None
