"""IPL's losses as small pure functions on CLIP features.

Inputs are **raw** (un-normalised) CLIP features; every function L2-normalises what it needs.
Shapes: ``n`` = batch size, ``D`` = CLIP embedding size. All functions return a 0-d tensor and
are differentiable w.r.t. every input.

* :func:`contrastive_loss` -- Stage 1, Eq. 3-4 (``form="paper"``) or the released code's
  symmetric InfoNCE (``form="infonce"``, default).
* :func:`domain_regularization_loss` -- Stage 1, Eq. 5 (in the released code's ``1 - cos`` form).
* :func:`adaptive_directional_loss` -- Stage 2, Eq. 7-9: one text direction per image pair.
* :func:`directional_loss` -- StyleGAN-NADA's directional CLIP loss: one text direction shared
  by the batch (the baseline IPL improves on).

**Zero-direction guard.** When ``G_t(w) == G_s(w)`` exactly (the first step of a deterministic
generator such as DiffAE's DDIM decoder, or StyleGAN with fixed noise) the image direction
``ΔI_i`` is the zero vector and its cosine with anything is undefined. StyleGAN-NADA /
DiffusionCLIP re-encode ``G_t(w) + 1e-6`` when the direction sums to 0. Being pure, these
functions cannot re-encode; instead directions are normalised as ``Δ / max(|Δ|, 1e-6)``, so a
zero ``ΔI_i`` contributes loss ``1`` (cos = 0) and a *finite* gradient ``-Norm(ΔT_i) / 1e-6``
w.r.t. ``ΔI_i`` -- the steepest-descent direction, which NADA's pixel perturbation only
approximates -- and never NaN. A zero ``ΔT_i`` (source and target prompts identical) likewise
gives loss 1 with zero gradient; trainers reject identical source and target labels.
"""

import torch
import torch.nn.functional as F

_DIRECTION_EPS = 1e-6


def _check(x, name, ndim, dim=None):
    if not torch.is_tensor(x) or x.ndim != ndim or not x.is_floating_point():
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        expected = "(n, D)" if ndim == 2 else "(D,)"
        raise ValueError(f"{name} must be a float tensor of shape {expected}, got {shape}.")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} has feature size {x.shape[-1]}, expected {dim} (same CLIP model for all inputs).")


def _normalize(x):
    """Row-wise L2 normalisation ``x / max(|x|, eps)`` (zero rows stay zero, see module docstring)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_DIRECTION_EPS)


def _text_as_row(x, name, dim):
    """Accept a shared text feature as ``(D,)`` or ``(1, D)``; return ``(1, D)``."""
    if torch.is_tensor(x) and x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    _check(x, name, 1, dim)
    return x.unsqueeze(0)


def contrastive_loss(image_features, text_features, logit_scale=100.0, form="infonce"):
    """Stage-1 contrastive loss between source images and their image-specific prompts (Eq. 3-4).

    ``Sim_ij = cos(Norm(E_I(G_s(w^i))), Norm(E_T(M_s^j)))`` (Eq. 3); pairs ``i = j`` are positives.

    Args:
        image_features: ``(n, D)`` raw image features ``E_I(G_s(w^i))``.
        text_features: ``(n, D)`` raw prompt features ``E_T(M_s^i)`` (row ``i`` belongs to image ``i``).
        logit_scale: CLIP's temperature multiplier, i.e. ``clip_model.logit_scale.exp()`` (100 for
            the OpenAI models; float or 0-d tensor). Used by ``"infonce"`` only.
        form: ``"infonce"`` (default): the released code's symmetric cross-entropy
            ``(CE(s·Sim, arange) + CE(s·Simᵀ, arange)) / 2`` -- CLIP's training loss with in-batch
            negatives; ``"paper"``: Eq. 4 literally, ``Σ_{i≠j} Sim_ij - Σ_i Sim_ii`` for the batch
            (a sum, so its scale grows with ``n²``; range ``[-n - n(n-1), n(n-1) + n]``).

    Returns:
        0-d tensor.

    Raises:
        ValueError: shape mismatch or unknown ``form``.
    """
    _check(image_features, "image_features", 2)
    _check(text_features, "text_features", 2, image_features.shape[-1])
    if text_features.shape[0] != image_features.shape[0]:
        raise ValueError(
            f"contrastive_loss needs one prompt per image: got {image_features.shape[0]} images and "
            f"{text_features.shape[0]} prompts."
        )
    sim = _normalize(image_features) @ _normalize(text_features).t()  # (n, n), Eq. 3
    if form == "paper":
        diagonal = sim.diagonal().sum()
        return (sim.sum() - diagonal) - diagonal
    if form == "infonce":
        logits = logit_scale * sim
        targets = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    raise ValueError(f"Unknown contrastive loss form {form!r}; expected 'infonce' or 'paper'.")


def domain_regularization_loss(prompt_text_features, label_features):
    """Domain regularisation (Eq. 5): keep image-specific target prompts close to the target label.

    Computed as the released code does, ``mean_i (1 - cos(E_T(M_t^i), E_T(Y_t)))``. Eq. 5 writes
    ``-Σ_i cos(...)``; the two differ by a constant and a factor ``1/n``, so they have the same
    minimiser -- the mean keeps the weight λ independent of the batch size.

    Args:
        prompt_text_features: ``(n, D)`` raw features ``E_T(M_t^i)`` (prompt vectors + target label).
        label_features: ``(D,)`` raw feature of the target label, e.g. the template average from
            :meth:`CLIPPromptEncoder.label_features` (``(1, D)`` is accepted too).

    Returns:
        0-d tensor in ``[0, 2]``.
    """
    _check(prompt_text_features, "prompt_text_features", 2)
    label = _text_as_row(label_features, "label_features", prompt_text_features.shape[-1])
    cos = (_normalize(prompt_text_features) * _normalize(label)).sum(dim=-1)
    return (1 - cos).mean()


def directional_domain_regularization_loss(source_text_features, target_text_features, source_label_features, target_label_features):
    """Not in the paper: a domain regulariser on each image's prompt *direction*.

    ``mean_i (1 - cos(ΔT_i, ΔY))`` with ``ΔT_i = Norm(E_T(M_t^i)) - Norm(E_T(M_s^i))`` (the
    direction Stage 2 follows, Eq. 8) and ``ΔY = Norm(E_T(Y_t)) - Norm(E_T(Y_s))`` (NADA's).
    Eq. 5 pulls each target prompt towards the target label's *feature*, while Eq. 4 keeps the
    source prompt on the image's own content, so whatever content the label carries ("red
    circle" for a sketch learnt from red-circle sketches) enters ΔT_i as label content minus
    image content; constraining the difference instead leaves the content to Eq. 4.

    With an image-defined target (:mod:`ipl_diffusion.adaptation.image_target`) the target
    label feature is that target's Eq. 5 anchor, so ΔY is the anchor's direction from the
    source label; Stage 2 then replaces the shared part of the directions by the image
    direction, and this regulariser only bounds each image's deviation from it.

    Args:
        source_text_features / target_text_features: ``(n, D)`` raw ``E_T(M_s^i)`` / ``E_T(M_t^i)``.
        source_label_features / target_label_features: ``(D,)`` (or ``(1, D)``) raw label features.

    Returns:
        0-d tensor in ``[0, 2]``. A prompt whose ΔT_i is 0 scores 1 (no direction; its gradient
        there is large, unlike the Stage-2 losses'), which Stage 1 never meets: the two labels
        differ, so the two prompts do.

    Raises:
        ValueError: inputs of the wrong shape, or labels with the same direction (ΔY = 0),
            which would switch the regulariser off without a word.
    """
    _check(source_text_features, "source_text_features", 2)
    _check(target_text_features, "target_text_features", 2)
    if source_text_features.shape != target_text_features.shape:
        raise ValueError(f"source and target prompt features differ in shape: {tuple(source_text_features.shape)} vs {tuple(target_text_features.shape)}")
    dim = source_text_features.shape[-1]
    label_direction = (_normalize(_text_as_row(target_label_features, "target_label_features", dim))
                       - _normalize(_text_as_row(source_label_features, "source_label_features", dim)))
    if float(label_direction.norm()) < _DIRECTION_EPS:
        raise ValueError("the source and target label features have the same direction: there is no label direction to follow")
    prompt_direction = _normalize(target_text_features) - _normalize(source_text_features)
    cos = (_normalize(prompt_direction) * _normalize(label_direction)).sum(dim=-1)
    return (1 - cos).mean()


def _directional(source_image_features, target_image_features, text_direction):
    delta_i = _normalize(target_image_features) - _normalize(source_image_features)  # Eq. 7
    cos = (_normalize(delta_i) * _normalize(text_direction)).sum(dim=-1)
    return (1 - cos).mean()  # Eq. 9, mean over the batch


def adaptive_directional_loss(source_image_features, target_image_features, source_text_features, target_text_features):
    """IPL's adaptive directional CLIP loss ``L_adapt`` (Eq. 7-9), mean over the batch.

    ``ΔI_i = Norm(E_I(G_t(w^i))) - Norm(E_I(G_s(w^i)))`` (Eq. 7),
    ``ΔT_i = Norm(E_T(M_t^i)) - Norm(E_T(M_s^i))`` (Eq. 8),
    ``L = mean_i (1 - cos(ΔI_i, ΔT_i))`` (Eq. 9; the paper sums, the released code averages).

    Args:
        source_image_features: ``(n, D)`` raw ``E_I(G_s(w^i))``.
        target_image_features: ``(n, D)`` raw ``E_I(G_t(w^i))``.
        source_text_features: ``(n, D)`` raw ``E_T(M_s^i)`` (prompt vectors of image ``i`` + source label).
        target_text_features: ``(n, D)`` raw ``E_T(M_t^i)`` (same vectors + target label).

    Returns:
        0-d tensor in ``[0, 2]``. See the module docstring for zero directions.
    """
    _check(source_image_features, "source_image_features", 2)
    dim, n = source_image_features.shape[-1], source_image_features.shape[0]
    for name, x in (("target_image_features", target_image_features), ("source_text_features", source_text_features),
                    ("target_text_features", target_text_features)):
        _check(x, name, 2, dim)
        if x.shape[0] != n:
            raise ValueError(f"{name} has {x.shape[0]} rows but source_image_features has {n}; all must be (n, D).")
    delta_t = _normalize(target_text_features) - _normalize(source_text_features)  # Eq. 8
    return _directional(source_image_features, target_image_features, delta_t)


def directional_loss(source_image_features, target_image_features, source_text_features, target_text_features):
    """StyleGAN-NADA's directional CLIP loss: one text direction ``ΔT`` shared by the whole batch.

    ``ΔT = Norm(T_t) - Norm(T_s)`` from two label features (e.g. template averages), then the
    same ``mean_i (1 - cos(ΔI_i, ΔT))`` as Eq. 9. (NADA averages ``Norm`` of each template's
    feature and does not re-normalise the two averages before subtracting; with our
    template-averaged label features the two directions differ only by the few-percent norm
    difference of the two averages.)

    Args:
        source_image_features: ``(n, D)`` raw ``E_I(G_s(w^i))``.
        target_image_features: ``(n, D)`` raw ``E_I(G_t(w^i))``.
        source_text_features: ``(D,)`` (or ``(1, D)``) raw source-label feature.
        target_text_features: ``(D,)`` (or ``(1, D)``) raw target-label feature.

    Returns:
        0-d tensor in ``[0, 2]``.
    """
    _check(source_image_features, "source_image_features", 2)
    dim = source_image_features.shape[-1]
    _check(target_image_features, "target_image_features", 2, dim)
    if target_image_features.shape[0] != source_image_features.shape[0]:
        raise ValueError("source_image_features and target_image_features must have the same number of rows.")
    source_text = _text_as_row(source_text_features, "source_text_features", dim)
    target_text = _text_as_row(target_text_features, "target_text_features", dim)
    delta_t = _normalize(target_text) - _normalize(source_text)
    return _directional(source_image_features, target_image_features, delta_t)


__all__ = ["contrastive_loss", "domain_regularization_loss", "directional_domain_regularization_loss", "adaptive_directional_loss", "directional_loss"]
