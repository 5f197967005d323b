"""Labelled image grids: the one way this package lays out before/after pictures.

Small generators (the 32-px Shapes world) give tiles too small to judge by eye, so tiles are
upscaled with nearest-neighbour resampling (no blur: edges and hatching stay as drawn) and
every row and column carries a label.
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


def labelled_grid(
    rows: Sequence[torch.Tensor],
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
    min_tile: int = 96,
):
    """One PIL image: ``rows[r][c]`` at row ``r``, column ``c``, with labels.

    Args:
        rows: tensors ``(B_r, 3, H, W)`` in ``[-1, 1]`` (all the same ``H, W``); a row with
            fewer images than the widest leaves its last cells white.
        row_labels: one label per row, drawn to the left (e.g. ``"source"``, ``"adapted"``).
        column_labels: one label per column, drawn above (e.g. the image index).
        min_tile: tiles are upscaled by the smallest whole factor that makes them at least
            this many pixels wide (nearest-neighbour, so nothing is blurred).

    Returns:
        ``PIL.Image.Image`` (RGB).

    Raises:
        ValueError: no rows, mismatched tile sizes or label counts.
    """
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("labelled_grid needs at least one row")
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
    canvas = Image.new("RGB", (left + cols * (tile_w + _MARGIN), top + len(rows) * (tile_h + _MARGIN)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = top + r * (tile_h + _MARGIN)
        if row_labels:
            draw.text((_MARGIN, y + tile_h // 2), row_labels[r], fill="black", font=font, anchor="lm")
        for c, tile in enumerate(to_uint8(row).numpy()):
            image = Image.fromarray(tile).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(image, (left + c * (tile_w + _MARGIN), y))
    for c, label in enumerate(column_labels or ()):
        draw.text((left + c * (tile_w + _MARGIN) + tile_w // 2, _MARGIN), label, fill="black", font=font, anchor="mt")
    return canvas
