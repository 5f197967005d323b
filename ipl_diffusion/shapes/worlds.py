"""Shapes "worlds": the joint distribution of style and content a Shapes CLIP is trained on.

A real CLIP learns its domain labels from internet data in which style and content co-occur
(IPL §4.2: the web's Ukiyo-e faces have narrow eyes and pale skin), so the text direction
"photo" -> "Ukiyo-e" carries content, and NADA's one fixed direction pushes every image
towards that content. A Shapes CLIP trained on the renderer's *balanced* factors (every style
equally likely with every shape and colour) has a compositional text space instead, and the
two cannot be told apart on it.

This module draws training factors for a *biased* world: for each non-source style, chosen
content factors take one fixed value with probability ``bias`` (e.g. most sketches are red
circles, most neon is blue) and are uniform otherwise; the source style ("photo") stays
balanced, so the generators trained on photos are unchanged. ``bias = 0`` is the balanced
(control) world.
"""

import torch

from .renderer import COLORS, SHAPES, SOURCE_STYLE, STYLES, sample_factors

# Which content each target style co-occurs with in the biased world: style -> {factor: value}.
# Sketch carries both a shape and a colour, so an adaptation to "sketch" can show drift in
# either; the other styles carry one factor each.
DEFAULT_STYLE_BIAS = {
    "sketch": {"shape": "circle", "color": "red"},
    "neon": {"color": "blue"},
    "pixel art": {"shape": "square"},
    "mosaic": {"color": "green"},
}

_NAMES = {"shape": SHAPES, "color": COLORS}


def validate_style_bias(style_bias):
    """Check a ``{style: {factor: value}}`` spec; returns it with indices instead of names.

    Raises ``ValueError`` for an unknown style, the source style, a factor other than
    ``shape`` / ``color`` or an unknown value.
    """
    resolved = {}
    for style, factors in style_bias.items():
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r} in the style bias; known: {', '.join(STYLES)}")
        if style == SOURCE_STYLE:
            # The source generators were trained on balanced photos; a biased source style
            # would change what they should have learnt.
            raise ValueError(f"the source style {SOURCE_STYLE!r} stays balanced; bias only target styles")
        resolved[STYLES.index(style)] = {}
        for factor, value in factors.items():
            if factor not in _NAMES:
                raise ValueError(f"a style can only be biased towards a shape or a color, got factor {factor!r}")
            if value not in _NAMES[factor]:
                raise ValueError(f"unknown {factor} {value!r}; known: {', '.join(_NAMES[factor])}")
            resolved[STYLES.index(style)][factor] = _NAMES[factor].index(value)
    return resolved


def sample_world_factors(batch_size, bias=0.0, style_bias=None, generator=None, seed=0):
    """Factors of ``batch_size`` training images of a world with the given ``bias``.

    Args:
        batch_size: number of images.
        bias: in ``[0, 1]``; per biased (style, factor) pair, the probability that the factor
            takes the style's value (otherwise it stays uniform, so it can still take that
            value by chance: the value's overall share is ``bias + (1 - bias) / n_values``).
        style_bias: ``{style: {"shape"|"color": name}}``; :data:`DEFAULT_STYLE_BIAS` if None.
        generator / seed: randomness, as :func:`~ipl_diffusion.shapes.renderer.sample_factors`.

    Returns:
        a :class:`~ipl_diffusion.shapes.renderer.ShapeFactors`; styles stay uniform.
    """
    if not 0.0 <= float(bias) <= 1.0:
        raise ValueError(f"bias must lie in [0, 1], got {bias}")
    g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    factors = sample_factors(batch_size, generator=g)
    spec = validate_style_bias(DEFAULT_STYLE_BIAS if style_bias is None else style_bias)
    # Drawn for every image and factor whatever the bias, so bias 0 and bias 0.9 runs of one
    # seed see the same styles, positions and sizes (only the biased content differs).
    draws = {factor: torch.rand(batch_size, generator=g) for factor in _NAMES}
    for style, wanted in spec.items():
        is_style = factors.style == style
        for factor, value in wanted.items():
            hit = is_style & (draws[factor] < bias)
            current = getattr(factors, factor)
            setattr(factors, factor, torch.where(hit, torch.full_like(current, value), current))
    return factors


def world_share(factors, style, factor, value):
    """Fraction of images of ``style`` whose ``factor`` is ``value`` (a check of the sampler)."""
    mask = factors.style == STYLES.index(style)
    if not mask.any():
        return float("nan")
    return float((getattr(factors, factor)[mask] == _NAMES[factor].index(value)).float().mean())
