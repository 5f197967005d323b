"""Differentiable CLIP image preprocessing and image features ``E_I`` (Eq. 3, 7).

CLIP's own ``CLIPImageProcessor`` works on PIL/numpy images and breaks the autograd graph, but
the directional CLIP loss needs gradients from ``E_I(G_t(w))`` back into the generator. So we
redo its tensor part in torch, as StyleGAN-NADA does: ``[-1, 1] -> [0, 1]`` → resize the
shortest edge to the vision model's input size → centre crop → normalise with the
processor's ``image_mean`` / ``image_std``. The mean, std and resampling filter are read from
the image processor (object or its config dict), never hard-coded, so a CLIP variant with
other statistics (e.g. SigLIP-style 0.5/0.5) is handled correctly. The output size comes
from the vision model's config (``vision_config.image_size``), which is what the model needs.
"""

import torch
import torch.nn.functional as F

from ipl_diffusion.errors import UserError
from .clip_loading import DEFAULT_CLIP_ID, load_clip_component

# PIL resampling codes stored in image-processor configs -> torch interpolation modes.
# torch has no Lanczos/box/Hamming; the closest antialiased filter is used instead.
_PIL_RESAMPLE_TO_TORCH = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}


def image_processor_settings(image_processor):
    """Read ``(image_mean, image_std, mode)`` from a ``CLIPImageProcessor`` or its config dict.

    Args:
        image_processor: a transformers image processor (anything with ``image_mean``,
            ``image_std`` and optionally ``resample`` attributes) or a dict such as
            ``CLIPImageProcessor.to_dict()`` / the ``preprocessor_config.json`` contents.

    Returns:
        ``(mean, std, mode)``: two tuples of 3 floats and a ``torch.nn.functional.interpolate``
        mode (``"bicubic"`` for CLIP's resample=3).

    Raises:
        ValueError: mean/std missing, not of length 3, or std not positive.
    """
    if isinstance(image_processor, dict):
        get = image_processor.get
    else:
        def get(key, default=None):
            return getattr(image_processor, key, default)

    mean, std = get("image_mean"), get("image_std")
    if mean is None or std is None:
        raise UserError(
            "The image processor config has no image_mean/image_std; pass the CLIPImageProcessor that belongs "
            "to the CLIP model (e.g. CLIPImageProcessor.from_pretrained(<clip id or folder>)) or its config dict."
        )
    mean = tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
    std = tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise UserError(f"Expected 3 channel means and 3 positive stds, got image_mean={mean}, image_std={std}.")
    resample = get("resample", 3)
    resample = int(getattr(resample, "value", resample)) if resample is not None else 3
    return mean, std, _PIL_RESAMPLE_TO_TORCH.get(resample, "bicubic")


def preprocess_images(images, image_size, mean, std, mode="bicubic"):
    """Differentiable CLIP preprocessing.

    Args:
        images: float tensor ``(B, 3, H, W)`` in ``[-1, 1]`` (any H, W; non-square is fine).
        image_size: the vision model's input size (``vision_config.image_size``, 224 for ViT-B/32).
        mean, std: per-channel normalisation from the image processor.
        mode: interpolation mode; antialiasing is on for (bi)linear/bicubic downsampling, which
            matters when 1024-px generator outputs go to 224 px.

    Returns:
        ``pixel_values`` ``(B, 3, image_size, image_size)``, same dtype/device as ``images``;
        gradients flow back to ``images``.

    Raises:
        ValueError: not a 4-D float tensor with 3 channels.
    """
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"Expected images of shape (B, 3, H, W) in [-1, 1], got {shape}.")
    if not images.is_floating_point():
        raise ValueError(f"Expected a float image tensor in [-1, 1], got dtype {images.dtype}.")
    x = (images + 1) / 2  # [-1, 1] -> [0, 1], what CLIP's mean/std expect
    height, width = x.shape[-2:]
    if (height, width) != (image_size, image_size):
        scale = image_size / min(height, width)
        new_h, new_w = max(image_size, round(height * scale)), max(image_size, round(width * scale))
        if (new_h, new_w) != (height, width):
            kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
            x = F.interpolate(x, size=(new_h, new_w), mode=mode, **kwargs)
        top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
        x = x[..., top : top + image_size, left : left + image_size]
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class CLIPImageEncoder:
    """CLIP image tower ``E_I`` on generator outputs, differentiably.

    Args:
        clip_model: a ``transformers.CLIPModel`` (frozen by this class unless ``freeze=False``).
        image_processor: its ``CLIPImageProcessor`` or that processor's config dict; only
            ``image_mean``, ``image_std`` and ``resample`` are used.
        freeze: set ``requires_grad_(False)`` and ``eval()`` on the CLIP model (IPL and NADA
            never train CLIP; gradients still flow *through* it to the images).
    """

    def __init__(self, clip_model, image_processor, freeze=True):
        self.clip_model = clip_model
        self.mean, self.std, self.mode = image_processor_settings(image_processor)
        if freeze:
            clip_model.requires_grad_(False).eval()

    @property
    def image_size(self):
        """Input size of the vision model (pixels)."""
        return int(self.clip_model.config.vision_config.image_size)

    @property
    def projection_dim(self):
        """D, the joint embedding size."""
        return int(self.clip_model.visual_projection.out_features)

    @property
    def device(self):
        return next(self.clip_model.parameters()).device

    def preprocess(self, images):
        """``(B, 3, H, W)`` in ``[-1, 1]`` -> CLIP ``pixel_values`` ``(B, 3, S, S)``; differentiable."""
        images = images.to(device=self.device, dtype=next(self.clip_model.parameters()).dtype)
        return preprocess_images(images, self.image_size, self.mean, self.std, self.mode)

    def encode_images(self, images):
        """Raw (un-normalised) CLIP image features.

        Args:
            images: ``(B, 3, H, W)`` float in ``[-1, 1]``, on any device (moved to CLIP's).

        Returns:
            ``(B, D)`` features ``visual_projection(vision_model(...).pooler_output)``, the same
            as ``CLIPModel.get_image_features``; gradients flow to ``images``.
        """
        pixel_values = self.preprocess(images)
        pooled = self.clip_model.vision_model(pixel_values=pixel_values).pooler_output
        return self.clip_model.visual_projection(pooled)

    @classmethod
    def from_pretrained(cls, path_or_id=DEFAULT_CLIP_ID, device=None, dtype=None, **kwargs):
        """Load ``CLIPModel`` + ``CLIPImageProcessor`` from a Hub id or a local folder.

        Raises:
            FileNotFoundError: a component is missing (offline: immediately); the message says
                which one and how to pass a local path.
        """
        from transformers import CLIPImageProcessorPil, CLIPModel

        model = load_clip_component(CLIPModel, path_or_id, "CLIP model", **kwargs)
        processor = load_clip_component(CLIPImageProcessorPil, path_or_id, "CLIP image processor")
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return cls(model, processor)


__all__ = ["CLIPImageEncoder", "image_processor_settings", "preprocess_images"]


def clip_image_features(clip_model, feature_extractor=None):
    """Differentiable CLIP image features: images ``(B, 3, H, W)`` in ``[-1, 1]`` -> raw
    projected features ``(B, D)``, the ``E_I`` of Eq. 7.

    ``feature_extractor`` (a ``CLIPImageProcessor``) supplies the normalisation; without one,
    ``CLIPImageProcessorPil()``'s defaults are OpenAI CLIP's mean / std.
    """
    from transformers import CLIPImageProcessorPil

    return CLIPImageEncoder(clip_model, feature_extractor or CLIPImageProcessorPil()).encode_images
