"""The Shapes renderer: determinism, ranges, and that every factor is observable in every style."""

import colorsys

import pytest
import torch

from ipl_diffusion.shapes import COLORS, SHAPES, STYLES, ShapesRenderer, check_domain, known_domains, sample_factors
from ipl_diffusion.shapes.renderer import _PALETTE, style_index


@pytest.fixture(scope="module")
def renderer():
    return ShapesRenderer(32)


def test_same_seed_same_images_other_seed_other_images(renderer):
    a, fa = renderer.sample(16, seed=3)
    b, fb = renderer.sample(16, seed=3)
    c, _ = renderer.sample(16, seed=4)
    assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(fa.as_dict().values(), fb.as_dict().values()))
    assert not torch.equal(a, c)
    # Re-rendering given factors with the same seed is exact too.
    assert torch.equal(renderer(fa, seed=11), renderer(fa, seed=11))


@pytest.mark.parametrize("resolution", [32, 64])
def test_shape_dtype_and_range(resolution):
    images, factors = ShapesRenderer(resolution).sample(10, seed=0)
    assert images.shape == (10, 3, resolution, resolution) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert len(factors) == 10 and factors.position.shape == (10, 2)


def test_fixed_factors_and_errors(renderer):
    _, f = renderer.sample(6, seed=0, style="pixel art", shape="ring", color=["red"] * 6)
    assert (f.style == STYLES.index("pixel art")).all() and (f.shape == SHAPES.index("ring")).all()
    assert (f.color == COLORS.index("red")).all()
    with pytest.raises(ValueError, match="known styles"):
        sample_factors(2, style="watercolour")
    with pytest.raises(ValueError, match="Expected 3"):
        sample_factors(3, shape=["circle"])
    with pytest.raises(ValueError, match="multiple of 16"):
        ShapesRenderer(30)
    assert style_index("Pixel-Art") == STYLES.index("pixel art")


def _hue(rgb):
    return colorsys.rgb_to_hsv(*[float(v) for v in rgb])[0]


def _hue_distance(a, b):
    d = abs(a - b) % 1.0
    return min(d, 1 - d)


@pytest.mark.parametrize("style", STYLES)
def test_object_colour_is_observable_in_every_style(renderer, style):
    """The most saturated pixels carry the object's colour (backgrounds are desaturated)."""
    images, factors = renderer.sample(60, seed=1, style=style)
    rgb = (images + 1) / 2
    saturation = rgb.max(1).values - rgb.min(1).values  # (B, H, W)
    palette_hues = [_hue(c) for c in _PALETTE]
    correct = 0
    for i in range(len(factors)):
        top = saturation[i].flatten().topk(8).indices
        mean = rgb[i].flatten(1)[:, top].mean(1)
        guess = min(range(len(COLORS)), key=lambda k: _hue_distance(_hue(mean), palette_hues[k]))
        correct += guess == int(factors.color[i])
    assert correct >= 57, f"{style}: colour recovered for only {correct}/60 images"


def test_photo_object_centroid_and_size_follow_the_factors(renderer):
    images, factors = renderer.sample(200, seed=2, style="photo")
    rgb = (images + 1) / 2
    # Object pixels: closer to the object's (shaded) palette colour than to the background,
    # estimated from the image corners (objects never reach them).
    corners = torch.stack([rgb[:, :, 0, 0], rgb[:, :, 0, -1], rgb[:, :, -1, 0], rgb[:, :, -1, -1]]).mean(0)
    to_object = (rgb - 0.85 * _PALETTE[factors.color].view(-1, 3, 1, 1)).norm(dim=1)
    to_background = (rgb - corners.view(-1, 3, 1, 1)).norm(dim=1)
    mask = (to_object < to_background).float()
    ys, xs = torch.meshgrid(torch.arange(32.0) + 0.5, torch.arange(32.0) + 0.5, indexing="ij")
    area = mask.sum((1, 2))
    cx = (mask * xs).sum((1, 2)) / area
    cy = (mask * ys).sum((1, 2)) / area
    error = torch.stack([cx, cy], 1) - factors.position * 32
    # The triangle's centroid is its position; the highlight of the shading costs a little.
    assert error.abs().mean() < 0.6, error.abs().mean()
    assert error.abs().max() < 2.0
    for s in range(len(SHAPES)):
        sel = factors.shape == s
        corr = torch.corrcoef(torch.stack([area[sel].sqrt(), factors.size[sel]]))[0, 1]
        assert corr > 0.95, (SHAPES[s], corr)


def test_styles_differ_for_the_same_object(renderer):
    factors = sample_factors(8, seed=5, style="photo")
    photos = renderer(factors, seed=0)
    for style in STYLES[1:]:
        other = renderer(factors.with_style(style), seed=0)
        assert (other - photos).abs().mean() > 0.1, style


def test_known_domains_and_check_domain():
    assert known_domains()[0] == "photo" and len(known_domains()) >= 5
    assert check_domain(" Pixel_Art ") == "pixel art"
    with pytest.raises(ValueError, match="known domains: photo, sketch"):
        check_domain("Wall painting")
    with pytest.raises(ValueError, match=r"'skech' \(did you mean 'sketch'\?\)"):
        check_domain("skech")
    for far_off in ("Wall painting", "noon", "stretch", "ketchup"):  # not typos of neon / sketch
        with pytest.raises(ValueError) as refused:
            check_domain(far_off)
        assert "did you mean" not in str(refused.value), far_off
    for start, meant in (("pixel", "pixel art"), ("photograph", "photo"), ("mosiac", "mosaic")):
        with pytest.raises(ValueError, match=rf"\(did you mean '{meant}'\?\)"):
            check_domain(start)
    with pytest.raises(ValueError, match="Empty"):
        check_domain("  ")


def test_source_images_are_seeded_photos():
    from ipl_diffusion.shapes import source_images

    a, b = source_images(4, seed=1), source_images(4, seed=1)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    photos, _ = ShapesRenderer(32).sample(4, seed=1, style="photo")
    assert torch.equal(a, photos)
