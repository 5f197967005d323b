"""The Shapes world: a seeded, batched torch renderer of one object per image, in several styles.

Every image shows one object whose ground-truth factors are known: shape, colour, position,
size and background. The *style* plays the role of a domain: ``"photo"`` (filled, shaded, with
a drop shadow on a soft background) is the source domain the generators are trained on; the
other styles are adaptation targets. Each style keeps every factor observable, so an oracle can
measure how well an adapted image preserves its source image (our analogue of SCS / ID
similarity, IPL §4.2): sketch outlines are tinted with the object colour, neon tubes glow in
it, pixel-art blocks and mosaic tiles are small enough (H/16 px) to tell a small triangle from
a circle.

Shapes are drawn from signed distance functions evaluated on the pixel grid, so one batch of
any mix of factors and styles is a handful of tensor operations (thousands of images per
second on a CPU). Randomness comes only from a ``torch.Generator`` seeded by the caller, so a
seed fixes the images exactly.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ipl_diffusion.errors import UserError

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
STYLES = ("photo", "sketch", "neon", "pixel art", "mosaic")
BACKGROUNDS = ("grey", "beige", "blue", "green")
SOURCE_STYLE = "photo"

# Object colours (RGB in [0, 1]); spread in hue so every style keeps them apart.
_PALETTE = torch.tensor(
    [
        [0.86, 0.14, 0.14],  # red
        [0.13, 0.66, 0.20],  # green
        [0.16, 0.30, 0.92],  # blue
        [0.96, 0.84, 0.12],  # yellow
        [0.58, 0.18, 0.78],  # purple
        [0.10, 0.78, 0.84],  # cyan
    ]
)
# Background tints (RGB in [0, 1]); light and desaturated so that no object colour is lost.
_BACKGROUND = torch.tensor(
    [
        [0.78, 0.78, 0.78],  # grey
        [0.86, 0.80, 0.68],  # beige
        [0.70, 0.78, 0.88],  # blue
        [0.72, 0.84, 0.72],  # green
    ]
)

# Ranges of the continuous factors, in units of the image side (so they hold at any resolution).
POSITION_RANGE = (0.30, 0.70)  # object centre, x and y
SIZE_RANGE = (0.15, 0.27)  # object "radius": circumradius-like half extent of the shape


@dataclass
class ShapeFactors:
    """Ground-truth factors of a batch of Shapes images.

    All tensors have a leading batch dimension ``B`` and live on the CPU.

    * ``shape``, ``color``, ``style``, ``background``: ``int64`` indices into :data:`SHAPES`,
      :data:`COLORS`, :data:`STYLES`, :data:`BACKGROUNDS`.
    * ``position``: ``float32 (B, 2)`` object centre ``(x, y)`` in units of the image side
      (``x`` to the right, ``y`` downwards, ``(0.5, 0.5)`` is the centre).
    * ``size``: ``float32 (B,)`` object half extent in units of the image side.
    """

    shape: torch.Tensor
    color: torch.Tensor
    style: torch.Tensor
    background: torch.Tensor
    position: torch.Tensor
    size: torch.Tensor

    def __len__(self):
        return self.shape.shape[0]

    def __getitem__(self, index):
        """A sub-batch (``index`` is anything a tensor accepts: int slice, bool mask, index tensor)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return ShapeFactors(**{k: v[index] for k, v in self.as_dict().items()})

    def as_dict(self):
        return dict(
            shape=self.shape,
            color=self.color,
            style=self.style,
            background=self.background,
            position=self.position,
            size=self.size,
        )

    def with_style(self, style):
        """The same objects in another style (``style``: a name from :data:`STYLES` or an index)."""
        index = style_index(style) if isinstance(style, str) else int(style)
        data = self.as_dict()
        data["style"] = torch.full_like(self.style, index)
        return ShapeFactors(**data)

    def describe(self, i):
        """Names of the categorical factors of image ``i`` as a dict of strings."""
        return dict(
            shape=SHAPES[int(self.shape[i])],
            color=COLORS[int(self.color[i])],
            style=STYLES[int(self.style[i])],
            background=BACKGROUNDS[int(self.background[i])],
        )

    @staticmethod
    def cat(items):
        return ShapeFactors(**{k: torch.cat([it.as_dict()[k] for it in items]) for k in items[0].as_dict()})


def style_index(style):
    """Index of ``style`` in :data:`STYLES`; ``ValueError`` listing the known styles otherwise."""
    key = str(style).strip().lower().replace("_", " ").replace("-", " ")
    if key not in STYLES:
        raise UserError(f"Unknown Shapes style {style!r}; known styles: {', '.join(STYLES)}.")
    return STYLES.index(key)


def _resolve(values, names, label, batch_size, generator):
    """Turn ``None`` (random), a name, an index or a sequence/tensor into an int64 ``(B,)`` tensor."""
    if values is None:
        return torch.randint(len(names), (batch_size,), generator=generator)
    if isinstance(values, (str, int)):
        values = [values] * batch_size
    if isinstance(values, torch.Tensor):
        out = values.to(torch.int64).flatten()
    else:
        out = []
        for v in values:
            if isinstance(v, str):
                if label == "style":
                    out.append(style_index(v))
                elif v in names:
                    out.append(names.index(v))
                else:
                    raise UserError(f"Unknown Shapes {label} {v!r}; known: {', '.join(names)}.")
            else:
                out.append(int(v))
        out = torch.tensor(out, dtype=torch.int64)
    if out.numel() != batch_size:
        raise ValueError(f"Expected {batch_size} {label} values, got {out.numel()}.")
    if out.numel() and (out.min() < 0 or out.max() >= len(names)):
        raise ValueError(f"{label} indices must lie in [0, {len(names) - 1}], got {out.tolist()}.")
    return out


def sample_factors(batch_size, seed=0, shape=None, color=None, style=None, background=None, generator=None):
    """Draw random factors for ``batch_size`` images.

    Any categorical factor may be fixed by passing a name, an index or one value per image;
    ``None`` draws it uniformly. ``seed`` seeds a fresh ``torch.Generator`` unless ``generator``
    is given. Position and size are uniform in :data:`POSITION_RANGE` / :data:`SIZE_RANGE`,
    with the position range shrunk for large objects so that they stay inside the image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    g = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    shape_t = _resolve(shape, SHAPES, "shape", batch_size, g)
    color_t = _resolve(color, COLORS, "color", batch_size, g)
    style_t = _resolve(style, STYLES, "style", batch_size, g)
    bg_t = _resolve(background, BACKGROUNDS, "background", batch_size, g)
    size = SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * torch.rand(batch_size, generator=g)
    lo, hi = POSITION_RANGE
    pos = lo + (hi - lo) * torch.rand(batch_size, 2, generator=g)
    return ShapeFactors(shape_t, color_t, style_t, bg_t, pos.float(), size.float())


# --------------------------------------------------------------------------------------------
# Signed distance functions, in shape units (the shape spans about [-1, 1]); negative inside.


def _sd_box(px, py, bx, by):
    qx, qy = px.abs() - bx, py.abs() - by
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sd_triangle(px, py):
    # Equilateral triangle with its apex up (image y grows downwards, hence -py), circumradius 1.1,
    # centred on its centroid (the standard closed form for the equilateral triangle SDF).
    r = 1.1 * math.sqrt(3) / 2  # half side
    k = math.sqrt(3.0)
    x = px.abs() - r
    y = -py + r / k
    flip = (x + k * y) > 0
    x2 = torch.where(flip, (x - k * y) / 2, x)
    y2 = torch.where(flip, (-k * x - y) / 2, y)
    x2 = x2 - x2.clamp(-2 * r, 0)
    return -torch.sqrt(x2**2 + y2**2) * torch.sign(y2)


def _signed_distance(shape, px, py):
    """``shape``: (B,1,1) int64; ``px``, ``py``: (B,H,W) in shape units. Returns (B,H,W)."""
    radius = torch.sqrt(px**2 + py**2)
    candidates = torch.stack(
        [
            radius - 1.0,  # circle
            _sd_box(px, py, 0.82, 0.82),  # square
            _sd_triangle(px, py),  # triangle
            (px.abs() + py.abs() - 1.1) / math.sqrt(2),  # diamond
            torch.minimum(_sd_box(px, py, 1.0, 0.34), _sd_box(px, py, 0.34, 1.0)),  # cross
            (radius - 0.72).abs() - 0.26,  # ring
        ]
    )
    # Pick each image's own shape: candidates (S, B, H, W), shape (B, 1, 1) -> (B, H, W).
    index = shape.view(1, -1, 1, 1).expand(1, *candidates.shape[1:])
    return candidates.gather(0, index).squeeze(0)


# --------------------------------------------------------------------------------------------


def _smooth_noise(batch, cells, size, generator):
    """Low-frequency noise (B, 1, size, size) in about [-1, 1]: bilinear upsampling of a coarse grid."""
    coarse = torch.rand(batch, 1, cells, cells, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(-1, 1)


def _blur(x, sigma_px):
    """Separable Gaussian blur of (B, C, H, W) with reflect padding."""
    radius = max(1, int(math.ceil(3 * sigma_px)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t**2) / (2 * sigma_px**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _tile(resolution):
    """Mosaic tile side in pixels: 2 px at 32, 4 px at 64."""
    return max(2, resolution // 16)


def _blocks(x, block):
    """Average over ``block``×``block`` cells and expand back (pixel-art / mosaic quantisation)."""
    if block <= 1:
        return x
    return F.interpolate(F.avg_pool2d(x, block), scale_factor=block, mode="nearest")


class ShapesRenderer:
    """Batched renderer of the Shapes world.

    Args:
        resolution: image side in pixels, a multiple of 16 (32 by default; 64 also supported).

    ``renderer(factors, seed)`` returns images ``float32 (B, 3, H, W)`` in ``[-1, 1]``.
    ``renderer.sample(batch_size, seed, **fixed)`` draws factors and renders them, returning
    ``(images, factors)``. The same ``(factors, seed)`` always gives the same images.
    """

    def __init__(self, resolution=32):
        if resolution < 16 or resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 and >= 16, got {resolution}.")
        self.resolution = int(resolution)
        coords = (torch.arange(self.resolution, dtype=torch.float32) + 0.5) / self.resolution
        self._ys, self._xs = torch.meshgrid(coords, coords, indexing="ij")

    # -- public API -------------------------------------------------------------------------

    def sample(self, batch_size, seed=0, **fixed):
        """Draw factors (see :func:`sample_factors`; keyword args fix factors) and render them."""
        g = torch.Generator().manual_seed(int(seed))
        factors = sample_factors(batch_size, generator=g, **fixed)
        return self.render(factors, generator=g), factors

    def __call__(self, factors, seed=0):
        return self.render(factors, generator=torch.Generator().manual_seed(int(seed)))

    @torch.no_grad()
    def render(self, factors, generator):
        """Render ``factors`` (a :class:`ShapeFactors`) with randomness from ``generator``.

        Returns ``float32 (B, 3, H, W)`` in ``[-1, 1]``.
        """
        n, h = len(factors), self.resolution
        # Per-image nuisance randomness is drawn for the whole batch, whatever the style, so an
        # image's pixels depend only on its own factors and the seed, not on its batch-mates' styles.
        noise = dict(
            bg=_smooth_noise(n, 4, h, generator),
            tile=torch.rand(n, 1, h // _tile(h), h // _tile(h), generator=generator),
            jitter=(torch.rand(n, 3, generator=generator) - 0.5) * 0.06,
            grad_angle=torch.rand(n, generator=generator) * 2 * math.pi,
        )
        color = (_PALETTE[factors.color] + noise["jitter"]).clamp(0, 1)  # (B, 3)
        background = _BACKGROUND[factors.background]  # (B, 3)

        scale = factors.size.view(n, 1, 1)
        px = (self._xs.unsqueeze(0) - factors.position[:, 0].view(n, 1, 1)) / scale
        py = (self._ys.unsqueeze(0) - factors.position[:, 1].view(n, 1, 1)) / scale
        shape = factors.shape.view(n, 1, 1)
        # Distance in pixels, so edge softness and stroke widths are resolution-aware.
        dist = _signed_distance(shape, px, py) * scale * h
        pix = dict(px=px, py=py, dist=dist, shape=shape)

        out = torch.empty(n, 3, h, h)
        renderers = (self._photo, self._sketch, self._neon, self._pixel_art, self._mosaic)
        for s, fn in enumerate(renderers):
            mask = factors.style == s
            if mask.any():
                sub = {k: v[mask] for k, v in pix.items()}
                sub_noise = {k: v[mask] for k, v in noise.items()}
                out[mask] = fn(sub, color[mask], background[mask], factors[mask], sub_noise)
        return (out.clamp(0, 1) * 2 - 1).contiguous()

    @torch.no_grad()
    def render_on_background(self, factors, background_style, generator):
        """The objects of ``factors`` in their own style, on another style's background.

        Issue 18: an oracle trained only on whole renders can call a shaded photo object on a
        pale background a "sketch" (the background is the easiest cue). Training and testing
        it on such swaps makes it judge the object. ``background_style``: a style name or an
        index / ``(B,)`` int64 tensor of style indices. The object keeps its own style within a
        margin that holds its strokes, glow or outline (pixel art's outline, sketch's stroke,
        neon's inner glow); outside it every pixel is the background style's render of the
        same background factor with no object. Returns ``float32 (B, 3, H, W)`` in ``[-1, 1]``.
        """
        n, h = len(factors), self.resolution
        if isinstance(background_style, (str, int)):
            background_style = torch.full((n,), style_index(background_style) if isinstance(background_style, str) else int(background_style))
        objects = self.render(factors, generator)
        empty = factors.as_dict()
        empty["style"] = background_style.to(torch.int64)
        # Far outside the frame: the style's background alone (no object, glow or shadow).
        empty["position"] = torch.full_like(factors.position, -10.0)
        backgrounds = self.render(ShapeFactors(**empty), generator)
        scale = factors.size.view(n, 1, 1)
        px = (self._xs.unsqueeze(0) - factors.position[:, 0].view(n, 1, 1)) / scale
        py = (self._ys.unsqueeze(0) - factors.position[:, 1].view(n, 1, 1)) / scale
        dist = _signed_distance(factors.shape.view(n, 1, 1), px, py) * scale * h
        # Object margin per object style, in pixels: photo (its shadow belongs to the
        # background), sketch stroke, neon glow, pixel-art outline block, mosaic tile.
        margins = torch.tensor([0.0, 0.045 * h + 0.5, 0.10 * h, 1.5 * max(1, h // 16), 0.75 * _tile(h)])
        margin = margins[factors.style].view(n, 1, 1)
        mask = torch.sigmoid(-(dist - margin) / 0.45).unsqueeze(1)
        return (objects * mask + backgrounds * (1 - mask)).contiguous()

    # -- styles -----------------------------------------------------------------------------

    def _gradient_background(self, background, noise, strength):
        n = background.shape[0]
        a = noise["grad_angle"].view(n, 1, 1)
        ramp = (self._xs - 0.5) * torch.cos(a) + (self._ys - 0.5) * torch.sin(a)  # (B,H,W) in ~[-0.7,0.7]
        shade = 1 + strength * ramp.unsqueeze(1) + 0.04 * noise["bg"]
        return background.view(n, 3, 1, 1) * shade

    def _photo(self, pix, color, background, factors, noise):
        n, h = color.shape[0], self.resolution
        bg = self._gradient_background(background, noise, 0.25)
        # Soft drop shadow: the object's coverage shifted down-right and blurred.
        shift = 0.06 * factors.size.view(n, 1, 1) * h
        shadow_dist = _signed_distance(
            pix["shape"], pix["px"] - shift / (factors.size.view(n, 1, 1) * h), pix["py"] - shift / (factors.size.view(n, 1, 1) * h)
        ) * factors.size.view(n, 1, 1) * h
        shadow = _blur(torch.sigmoid(-shadow_dist / 0.7).unsqueeze(1), 0.04 * h)
        bg = bg * (1 - 0.35 * shadow)
        # Lambert-like shading: light from the top left, plus a soft specular highlight.
        light = (-0.35 * pix["px"] - 0.35 * pix["py"]).clamp(-1, 1).unsqueeze(1)
        highlight = torch.exp(-((pix["px"] + 0.35) ** 2 + (pix["py"] + 0.35) ** 2) / 0.08).unsqueeze(1)
        body = color.view(n, 3, 1, 1) * (0.82 + 0.28 * light) + 0.30 * highlight
        coverage = torch.sigmoid(-pix["dist"] / 0.45).unsqueeze(1)
        return bg * (1 - coverage) + body * coverage

    def _sketch(self, pix, color, background, factors, noise):
        n, h = color.shape[0], self.resolution
        # Paper: near-white, faintly tinted by the background factor.
        paper = (0.88 + 0.10 * background.view(n, 3, 1, 1)) * (1 + 0.02 * noise["bg"])
        width = 0.045 * h  # stroke half width, ~1.4 px at 32
        stroke = torch.sigmoid((width - pix["dist"].abs()) / 0.35).unsqueeze(1)
        # Diagonal hatching inside the object, in a light tint of its colour.
        period = max(3.0, h / 10)
        hatch = (torch.sin((self._xs + self._ys) * h * 2 * math.pi / period) > 0.3).float()[None, None]
        inside = torch.sigmoid(-pix["dist"] / 0.45).unsqueeze(1)
        ink = color.view(n, 3, 1, 1) * 0.8
        tint = paper * 0.55 + color.view(n, 3, 1, 1) * 0.45
        img = paper * (1 - inside * hatch) + tint * inside * hatch
        return img * (1 - stroke) + ink * stroke

    def _neon(self, pix, color, background, factors, noise):
        n, h = color.shape[0], self.resolution
        dark = 0.06 + 0.12 * background.view(n, 3, 1, 1) * (1 + 0.3 * noise["bg"])
        width = 0.035 * h
        tube = torch.sigmoid((width - pix["dist"].abs()) / 0.3).unsqueeze(1)
        glow = torch.exp(-(pix["dist"].abs() / (0.12 * h)) ** 2).unsqueeze(1)
        neon = color.view(n, 3, 1, 1)
        img = dark + 0.75 * glow * neon
        # The tube's core is over-exposed towards white, its rim keeps the colour.
        core = neon * 0.6 + 0.4
        return img * (1 - tube) + core * tube

    def _pixel_art(self, pix, color, background, factors, noise):
        n, h = color.shape[0], self.resolution
        block = max(1, h // 16)
        flat_bg = (background.view(n, 3, 1, 1) * 1.05).clamp(0, 1).expand(n, 3, h, h)
        inside = (pix["dist"] < 0).float().unsqueeze(1)
        # Quantise coverage on the block grid, then add a dark 1-block outline around the sprite.
        cover_small = (F.avg_pool2d(inside, block) >= 0.5).float() if block > 1 else inside
        grown_small = F.max_pool2d(cover_small, 3, stride=1, padding=1)
        cover = F.interpolate(cover_small, scale_factor=block, mode="nearest")
        grown = F.interpolate(grown_small, scale_factor=block, mode="nearest")
        outline = grown * (1 - cover)
        # A palette with 3 levels per channel: pixel art's limited colours.
        sprite = torch.round(color.view(n, 3, 1, 1) * 2) / 2
        img = flat_bg * (1 - grown) + sprite * cover + 0.12 * outline
        return img

    def _mosaic(self, pix, color, background, factors, noise):
        n, h = color.shape[0], self.resolution
        tile = _tile(h)
        inside = torch.sigmoid(-pix["dist"] / 0.45).unsqueeze(1)
        base = background.view(n, 3, 1, 1) * 0.85 * (1 - inside) + color.view(n, 3, 1, 1) * inside
        tiles = _blocks(base, tile)
        # Each tile's colour is jittered (glazed stones), then grout darkens one edge of every tile.
        jitter = F.interpolate(noise["tile"], size=(h, h), mode="nearest")[:, :, :h, :h]
        tiles = tiles * (0.88 + 0.24 * jitter)
        grout = torch.zeros(1, 1, h, h)
        grout[..., tile - 1 :: tile, :] = 1
        grout[..., :, tile - 1 :: tile] = 1
        return tiles * (1 - 0.3 * grout) + 0.08 * grout


def render(batch_size, resolution=32, seed=0, **fixed):
    """Shortcut: ``ShapesRenderer(resolution).sample(batch_size, seed, **fixed)`` -> ``(images, factors)``."""
    return ShapesRenderer(resolution).sample(batch_size, seed=seed, **fixed)
