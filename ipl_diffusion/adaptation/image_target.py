"""Image-defined targets: a few style images instead of (or beside) the target label.

StyleGAN-NADA's ``--style_img_dir`` (``ZSSGAN/criteria/clip_loss.py``,
``compute_img2img_direction``) replaces its text direction by an *image* direction

    d = Norm( mean_j Norm(E_I(S_j)) - mean_k Norm(E_I(G_s(z_k))) )

from the mean unit CLIP feature of ``N`` style images ``S_j`` to that of ``img2img_batch``
(16) source-generator samples. This module defines what an image target means for IPL,
whose text direction is not one vector but one per image (Eq. 8):

**Stage 2 (Eq. 7-9).** Let ``u_i = Norm(ΔT_i)`` be image ``i``'s unit direction from its
learned prompts (Eq. 8) and ``ū = mean_k u_k`` its mean over a fixed set of reference
source latents (DiffAE: the Stage-2 source images; StyleGAN2: the ``img2img_batch`` samples
that also give ``d``). ``ū`` is the part every image shares -- what NADA's single direction
is -- and ``u_i - ū`` what is specific to image ``i``. With an image target the shared part
is replaced by the image direction:

    ΔT_i^img = d + (u_i - ū)

so every image keeps its own deviation (IPL's point: no single direction for all images,
which is what collapses modes) around the direction the style images define. For the
``manual`` and ``learned`` schemes every row is the same (``u_i = ū``), so ``ΔT^img = d``:
exactly NADA's img2img direction. The trainers are unchanged: they receive the pair
``(-ΔT_i^img / 2, +ΔT_i^img / 2)`` as "source / target text features", whose Eq. 8
difference ``Norm(+) - Norm(-)`` is ``ΔT_i^img`` up to a positive factor, and Eq. 9 only
uses its direction.

**Stage 1 (Eq. 5).** The domain regulariser pulls each target prompt ``E_T(M_t^i)`` towards
a feature of the target domain, the label's template average ``E_T(Y_t)``. CLIP's image and
text features lie in separate cones (the modality gap), so the style images' mean feature
itself would pull the prompts along the gap, a direction the image-to-image ``ΔI_i`` of
Eq. 7 never takes. The anchor is therefore a *text-side* estimate of the target domain: the
source label's unit feature moved by the displacement of the image means,

    A_img = Norm(E_T(Y_s)) + (mean_j Norm(E_I(S_j)) - mean_k Norm(E_I(G_s(z_k))))

-- where ``E_T(Y_t)`` would be if text moved as the images do, the premise of every
directional CLIP loss. With a label too, Eq. 5's anchor is ``Norm(E_T(Y_t)) + Norm(A_img)``
(the two estimates, equally weighted; the loss normalises).

**Without a label** the prompts still need a target token (``M_t^i = [V]^i_1..[V]^i_m Y_t``,
Eq. 1): it is the neutral word :data:`NEUTRAL_TARGET_LABEL` ("style"), which Stage 1's
Eq. 5 then ties to ``A_img``; the direction of Stage 2 comes from ``d`` as above. With a
label, the label is the token (and, as in NADA, it plays no part in ``d``).

**Layer choice (GAN).** NADA's adaptive layer selection scores W+ rows by a global loss
towards the *text* label even with style images; here, with an image target, the target of
that global loss is the style images' mean unit feature (image to image, as ``d``).

**Other differences from NADA.** Style files are loaded by :func:`ipl_diffusion.images.load_images`
at CLIP's input size (shorter side resized bilinearly, centre crop) and encoded with the
differentiable CLIP preprocessing of every other feature here, where NADA used CLIP's PIL
preprocessing (bicubic); NADA's ``img2img_batch`` samples used random noise maps, ours fixed
ones (``source_cache``), so that a run is a function of its seed. The paper's equations are
in Guo et al., CVPR 2023; NADA's in ``rinongal/StyleGAN-nada`` (``ZSSGAN/criteria/clip_loss.py``,
``ZSSGAN/model/ZSSGAN.py`` ``set_img2img_direction``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ipl_diffusion.errors import UserError

# The prompts' target token when the target is defined by images alone (module docstring).
NEUTRAL_TARGET_LABEL = "style"


@dataclass
class ImageTarget:
    """What the style images define (all float32, on CLIP's device).

    Attributes:
        style_mean: ``(D,)`` mean of the style images' unit CLIP features.
        source_mean: ``(D,)`` mean of the reference source images' unit CLIP features.
        direction: ``(D,)`` unit, NADA's img2img direction ``Norm(style_mean - source_mean)``.
        count: number of style images; num_sources: number of reference source images.
        digest: sha256 of the style images' pixels (resume keys, ``run_config.json``).
    """

    style_mean: torch.Tensor
    source_mean: torch.Tensor
    direction: torch.Tensor
    count: int
    num_sources: int
    digest: str

    def report(self, label_given: bool) -> dict:
        """What ``run_config.json["target_images"]`` records."""
        return {"count": self.count, "label_given": label_given, "num_source_images": self.num_sources,
                "sha256": self.digest, "style_to_source_cos": float(F.cosine_similarity(
                    self.style_mean, self.source_mean, dim=0))}


def load_target_images(target_images, size: int) -> torch.Tensor:
    """The style images as ``float32 (N, 3, H, W)`` in ``[-1, 1]``.

    Args:
        target_images: a folder (its image files), one file, a list of paths / PIL images
            (each resized on its shorter side to ``size`` and centre-cropped, so sizes may
            differ), or a ``(N, 3, H, W)`` / ``(3, H, W)`` tensor in ``[-1, 1]`` (any H, W:
            CLIP's preprocessing resizes it).
        size: side files and PIL images are loaded at (CLIP's input size).

    Raises:
        UserFileNotFoundError: a missing folder or file, a folder without image files (the
            message names ``target_images=`` and the folder).
        UserError: an unreadable file (named), an empty list, a tensor of another shape, with
            NaN / inf, or outside ``[-1, 1]``.
    """
    from ipl_diffusion.images import check_image_tensor, list_image_files, load_images

    if torch.is_tensor(target_images):
        try:
            images = check_image_tensor(target_images)
        except UserError as err:
            raise UserError(f"target_images: {err}") from err
        if images.shape[0] < 1:
            raise UserError("target_images: the tensor holds no image")
        return images
    if isinstance(target_images, (str, os.PathLike)) and not os.path.isfile(target_images):
        # Listed here so that a missing or empty folder is refused naming target_images=.
        target_images = list_image_files(target_images, option="target_images=")
    if not isinstance(target_images, (str, os.PathLike, list, tuple)):
        raise UserError(f"target_images must be a folder, paths, PIL images or a (N, 3, H, W) tensor; "
                        f"got {type(target_images).__name__}")
    return load_images(target_images, size)[0]


@torch.no_grad()
def unit_features(image_features, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``(N, D)`` float32 unit CLIP features of ``images (N, 3, H, W)`` in ``[-1, 1]``
    (``image_features``: images -> raw ``(B, D)`` features)."""
    chunks = [image_features(images[i : i + batch_size]).float() for i in range(0, images.shape[0], batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1)


def img2img_direction(style_features: torch.Tensor, source_features: torch.Tensor) -> torch.Tensor:
    """NADA's image direction (``compute_img2img_direction``): ``(D,)`` unit
    ``Norm(mean Norm(style) - mean Norm(source))`` from raw ``(N, D)`` and ``(M, D)`` features.

    Raises:
        UserError: the two means coincide (no direction to follow).
    """
    delta = F.normalize(style_features.float(), dim=-1).mean(0) - F.normalize(source_features.float(), dim=-1).mean(0)
    if not torch.isfinite(delta).all() or float(delta.norm()) < 1e-6:
        raise UserError("target_images: the style images' mean CLIP feature equals the source images'; "
                        "they define no direction (are they source-domain images?)")
    return delta / delta.norm()


def make_image_target(image_features, style_images: torch.Tensor, source_images_features: torch.Tensor) -> ImageTarget:
    """:class:`ImageTarget` from the style images ``(N, 3, H, W)`` in ``[-1, 1]`` and the raw
    ``(M, D)`` CLIP features of the reference source images."""
    style = unit_features(image_features, style_images)
    source = F.normalize(source_images_features.float().to(style.device), dim=-1)
    digest = hashlib.sha256(style_images.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
    return ImageTarget(style.mean(0), source.mean(0), img2img_direction(style, source), style.shape[0],
                       source.shape[0], digest)


@torch.no_grad()
def domain_anchor(encoder, target: ImageTarget, source_label: str, target_label: str | None, templates: str):
    """Eq. 5's anchor for an image target: ``(D,)`` float32 (module docstring).

    ``A_img = Norm(E_T(Y_s)) + style_mean - source_mean``; with a ``target_label``,
    ``Norm(E_T(Y_t)) + Norm(A_img)``. ``E_T`` is the ``templates`` average of
    :meth:`~ipl_diffusion.clip_text.CLIPPromptEncoder.label_features`.
    """
    source = F.normalize(encoder.label_features(source_label, templates=templates).float(), dim=-1)
    anchor = source + (target.style_mean - target.source_mean).to(source.device)
    if target_label is None:
        return anchor
    label = F.normalize(encoder.label_features(target_label, templates=templates).float(), dim=-1)
    return label + F.normalize(anchor, dim=-1)


def shared_direction(source_text: torch.Tensor, target_text: torch.Tensor) -> torch.Tensor:
    """``ū = mean_k Norm(Norm(T_t,k) - Norm(T_s,k))``: ``(D,)``, the mean unit Eq. 8 direction
    of the reference prompt features ``(K, D)``."""
    delta = F.normalize(target_text.float(), dim=-1) - F.normalize(source_text.float(), dim=-1)
    return F.normalize(delta, dim=-1).mean(0)


def image_target_features(source_text: torch.Tensor, target_text: torch.Tensor, direction: torch.Tensor,
                          shared: torch.Tensor | None):
    """``(source', target')`` ``(B, D)`` float32 for the trainers: ``-/+ ΔT_i^img / 2`` with
    ``ΔT_i^img = d + (Norm(ΔT_i) - ū)`` (module docstring).

    Args:
        source_text, target_text: ``(B, D)`` raw prompt features ``E_T(M_s^i)``, ``E_T(M_t^i)``.
        direction: ``(D,)`` unit image direction ``d``.
        shared: ``(D,)`` ``ū`` from :func:`shared_direction`, or ``None`` for a scheme whose
            rows are one shared direction (manual, learned): then ``ΔT^img = d`` exactly.
    """
    d = direction.float().to(source_text.device).expand(source_text.shape[0], -1)
    if shared is None:
        delta = d.clone()
    else:
        own = F.normalize(F.normalize(target_text.float(), dim=-1) - F.normalize(source_text.float(), dim=-1), dim=-1)
        delta = d + own - shared.float().to(own.device)
    return -delta / 2, delta / 2


def shares_one_direction(learner) -> bool:
    """Whether ``learner``'s prompts are the same for every image (manual / learned schemes)."""
    return getattr(learner, "scheme", None) in ("manual", "learned")




def resolve_label(target_label, has_images: bool) -> tuple[str, bool]:
    """``(the prompts' target label, whether the caller gave one)``: the label, else the
    neutral word when style images define the target.

    Raises:
        UserError: neither a label (``None``) nor style images.
    """
    if target_label is not None:  # a blank one is refused by validate_label, naming it
        return target_label, True
    if not has_images:
        raise UserError("give a target label, target_images (a few style images), or both")
    return NEUTRAL_TARGET_LABEL, False


def setup(encoder, image_features, style_images: torch.Tensor, source_features: torch.Tensor, source_label: str,
          target_label: str, label_given: bool, templates: str):
    """``(ImageTarget, Eq. 5 anchor (D,))`` of one run from the style images ``(N, 3, H, W)``
    and the raw ``(M, D)`` features of its reference source images."""
    target = make_image_target(image_features, style_images, source_features)
    anchor = domain_anchor(encoder, target, source_label, target_label if label_given else None, templates)
    return target, anchor


def stage2_features(learner, target: ImageTarget, source_text: torch.Tensor, target_text: torch.Tensor,
                    reference: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The trainers' ``(source', target')`` ``(B, D)`` for rows ``source_text`` /
    ``target_text`` of Stage 1's prompts; ``ū`` from ``reference`` (``(K, D)`` source and
    target prompt features of the reference latents; default: these rows)."""
    shared = None
    if not shares_one_direction(learner):
        shared = shared_direction(*(reference if reference is not None else (source_text, target_text)))
    return image_target_features(source_text, target_text, target.direction, shared)


__all__ = ["NEUTRAL_TARGET_LABEL", "ImageTarget", "load_target_images", "img2img_direction", "make_image_target",
           "domain_anchor", "shared_direction", "image_target_features", "shares_one_direction", "unit_features",
           "resolve_label", "setup", "stage2_features"]
