"""Image grids: the one way this package lays out pictures side by side.

Small generators (the 32-px Shapes world) give tiles too small to judge by eye, so tiles are
upscaled with nearest-neighbour resampling (no blur: edges and hatching stay as drawn) and
rows and columns can carry labels (:func:`labelled_grid`). :func:`image_grid` lays out a flat
list of images in rows of a given width; with ``margin=0`` and ``min_tile=0`` either one gives
a seamless grid at the images' own size (``ipl sample``'s and ``ipl translate``'s grids).
"""

from __future__ import annotations

from typing import Sequence

import torch

_MARGIN = 4


def _font(size: int):
    from PIL import ImageFont

    try:  # Pillow >= 10.1 with FreeType draws the bundled font at any size
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` float in ``[-1, 1]`` -> ``(B, H, W, 3)`` uint8 on the CPU (clamped)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def _as_tensor(row) -> torch.Tensor:
    """A row given as PIL images -> ``(B, 3, H, W)`` in ``[-1, 1]`` (exact: uint8 values survive
    :func:`to_uint8`); a tensor is returned as it is."""
    if isinstance(row, torch.Tensor):
        return row
    import numpy as np

    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) for image in row]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError("every row of a grid must hold images of one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def labelled_grid(
    rows: Sequence[torch.Tensor | Sequence],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    min_tile: int = 96,
    margin: int = _MARGIN,
):
    """One PIL image: ``rows[r][c]`` at row ``r``, column ``c``, with labels.

    Args:
        rows: tensors ``(B_r, 3, H, W)`` in ``[-1, 1]``, or sequences of PIL images (all the
            same ``H, W``); a row with fewer images than the widest leaves its last cells white.
        row_labels: one label per row, drawn to the left (e.g. ``"source"``, ``"adapted"``).
        column_labels: one label per column, drawn above (e.g. the image index).
        min_tile: tiles are upscaled by the smallest whole factor that makes them at least
            this many pixels wide (nearest-neighbour, so nothing is blurred); 0 keeps their size.
        margin: white pixels between tiles (0: tiles touch).

    Returns:
        ``PIL.Image.Image`` (RGB).

    Raises:
        ValueError: no rows, mismatched tile sizes or label counts.
    """
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("labelled_grid needs at least one row")
    rows = [_as_tensor(row) for row in rows]
    h, w = rows[0].shape[-2:]
    if any(r.shape[-2:] != (h, w) for r in rows):
        raise ValueError("every row of a grid must hold images of one size")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    cols = max(r.shape[0] for r in rows)
    if column_labels is not None and len(column_labels) != cols:
        raise ValueError(f"{len(column_labels)} column labels for {cols} columns")
    scale = max(1, -(-min_tile // w))
    tile_h, tile_w = h * scale, w * scale
    font = _font(max(10, min(16, tile_h // 6)))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda s: int(measure.textlength(s, font=font))  # noqa: E731
    left = (max(text_w(s) for s in row_labels) + 3 * _MARGIN) if row_labels else 0
    top = (font.size if hasattr(font, "size") else 12) + 3 * _MARGIN if column_labels else 0
    canvas = Image.new("RGB", (left + cols * (tile_w + margin), top + len(rows) * (tile_h + margin)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = top + r * (tile_h + margin)
        if row_labels:
            draw.text((_MARGIN, y + tile_h // 2), row_labels[r], fill="black", font=font, anchor="lm")
        for c, tile in enumerate(to_uint8(row).numpy()):
            image = Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(image, (left + c * (tile_w + margin), y))
    for c, label in enumerate(column_labels or ()):
        draw.text((left + c * (tile_w + margin) + tile_w // 2, _MARGIN), label, fill="black", font=font, anchor="mt")
    return canvas


def image_grid(images, columns: int = 8, min_tile: int = 0, margin: int = 0):
    """One PIL image of ``images`` (a ``(B, 3, H, W)`` tensor in ``[-1, 1]`` or a sequence of
    PIL images of one size), ``columns`` to a row (fewer when there are fewer images), the last
    row's empty cells white; unlabelled, and by default seamless at the images' own size. See
    :func:`labelled_grid` for ``min_tile`` and ``margin``."""
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    rows = [images[start : start + columns] for start in range(0, len(images), columns)]
    return labelled_grid(rows, min_tile=min_tile, margin=margin)
