"""CLIP-space metrics: CLIP score and CLIP directional similarity.

* **CLIP directional similarity** (the quantity StyleGAN-NADA's directional loss optimises and
  IPL's Eq. 9 adapts per image): for each source/adapted pair,
  ``cos(E_I(adapted) - E_I(source), T(target) - T(source))`` with L2-normalised image
  embeddings ``E_I`` and template-averaged label embeddings ``T`` (79 ImageNet templates by
  default). Higher means the edit moved in the text direction.
* **CLIP score**: ``100 * max(cos(E_I(image), T(label)), 0)`` (torchmetrics' / Hessel et al.'s
  form with weight 100), alongside the raw cosine.

The functions take encoders as callables so that any CLIP-like model works (the shipped Shapes
models included): ``image_encoder(images (B, 3, H, W) in [-1, 1]) -> (B, D)`` and text features
as ``(D,)`` tensors. :func:`clip_encoders` builds both from a ``CLIPPromptEncoder`` with the
package's one CLIP preprocessing path (``ipl_diffusion.clip_image``) and template averaging
(``CLIPPromptEncoder.label_features``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ipl_diffusion.errors import UserError

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def encode_in_batches(images: torch.Tensor, image_encoder: ImageEncoder, batch_size: int = 32) -> torch.Tensor:
    """``(N, D)`` float64 image embeddings, encoded ``batch_size`` images at a time."""
    return torch.cat([image_encoder(images[s:s + batch_size]).detach().double().cpu()
                      for s in range(0, images.shape[0], batch_size)])


def directional_similarity_from_features(source_image_features: torch.Tensor, adapted_image_features: torch.Tensor,
                                         source_text_features: torch.Tensor, target_text_features: torch.Tensor,
                                         ) -> torch.Tensor:
    """``(N,)`` ``cos(n(a_i) - n(s_i), t_target - t_source)`` where ``n`` is L2 normalisation.

    Args:
        source_image_features, adapted_image_features: paired raw ``(N, D)`` embeddings.
        source_text_features, target_text_features: ``(D,)`` label embeddings.

    Raises:
        ValueError: unpaired features, or identical source and target text (no direction).
    """
    if source_image_features.shape != adapted_image_features.shape:
        raise UserError("source and adapted image features must be paired (same shape)")
    text_direction = target_text_features.double().flatten() - source_text_features.double().flatten()
    if text_direction.norm() == 0:
        raise UserError("the source and target labels give the same text embedding: no direction to compare with")
    image_direction = (F.normalize(adapted_image_features.double(), dim=-1)
                       - F.normalize(source_image_features.double(), dim=-1))
    # An unchanged image has no direction; F.normalize maps it to 0, i.e. similarity 0.
    return F.normalize(image_direction, dim=-1) @ F.normalize(text_direction, dim=0)


def clip_cosine_from_features(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``(N,)`` cosine similarity between each image embedding and one text embedding ``(D,)``."""
    return F.normalize(image_features.double(), dim=-1) @ F.normalize(text_features.double().flatten(), dim=0)


def clip_directional_similarity(source_images: torch.Tensor, adapted_images: torch.Tensor,
                                source_text_features: torch.Tensor, target_text_features: torch.Tensor,
                                image_encoder: ImageEncoder, batch_size: int = 32) -> torch.Tensor:
    """Per-pair CLIP directional similarity ``(N,)`` float64 for images ``(N, 3, H, W)`` in ``[-1, 1]``."""
    if source_images.shape[0] != adapted_images.shape[0]:
        raise UserError(
            f"CLIP directional similarity needs paired images, got {source_images.shape[0]} and {adapted_images.shape[0]}"
        )
    return directional_similarity_from_features(
        encode_in_batches(source_images, image_encoder, batch_size),
        encode_in_batches(adapted_images, image_encoder, batch_size),
        source_text_features, target_text_features,
    )


def clip_score(images: torch.Tensor, text_features: torch.Tensor, image_encoder: ImageEncoder,
               batch_size: int = 32) -> dict:
    """``{"clip_score": (N,) 100 * max(cos, 0), "cosine": (N,) cos}`` of images against one label."""
    cosine = clip_cosine_from_features(encode_in_batches(images, image_encoder, batch_size), text_features)
    return {"clip_score": 100 * cosine.clamp_min(0), "cosine": cosine}


def clip_encoders(prompt_encoder, templates="imagenet"):
    """``(image_encoder, label_encoder)`` from a :class:`~ipl_diffusion.clip_text.CLIPPromptEncoder`.

    Args:
        prompt_encoder: built with an image processor (``CLIPPromptEncoder.from_pretrained(path)``
            or ``CLIPPromptEncoder(model, tokenizer, image_processor)``).
        templates: passed to ``label_features``: ``"imagenet"`` (CLIP's 80), ``"nada"`` (the
            reference code's 79), ``"single"``, or a list of ``"{}"`` strings.

    Returns:
        ``image_encoder(images (B, 3, H, W) in [-1, 1]) -> (B, D)`` raw features through
        ``ipl_diffusion.clip_image`` preprocessing, and ``label_encoder(label) -> (D,)``
        template-averaged text features.
    """

    @torch.no_grad()
    def image_encoder(images):
        return prompt_encoder.encode_images(images)

    def label_encoder(label):
        return prompt_encoder.label_features(label, templates=templates)

    return image_encoder, label_encoder
