"""The one image loading / preprocessing path of ipl-diffusion.

Every pipeline, CLI command and example turns files or PIL images into model input with
:func:`load_image` / :func:`load_images`, and model output back into images with
:func:`to_pil`. The steps, in order:

1. **Open** with PIL. A missing file is a ``UserFileNotFoundError`` (a ``FileNotFoundError``);
   an unreadable, truncated or corrupt file a ``UserError`` (a ``ValueError``) naming it. Images
   larger than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 179
   megapixels at 2x the default) are refused with a ``UserError``: we do not raise the limit
   for you, because such files are either attacks or far larger than any model input;
   downscale them first (or raise the limit yourself if you trust the file).
2. **EXIF orientation** is applied (``ImageOps.exif_transpose``), so phone photos come out upright.
3. **Mode -> RGB**: transparent images (``RGBA``, ``LA``, ``PA``, palette images with a
   transparent colour) are composited on a white background (``background``); 16-bit
   integer images (``I;16*``, and ``I``, which PNG/TIFF decoders use for 16-bit data) are
   scaled from ``[0, 65535]`` to 8 bits; float ``F`` images are read as ``[0, 1]`` when their
   maximum is at most 1, otherwise as ``[0, 255]``; everything else (``L``, ``1``, ``P``,
   ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) is converted by PIL.
4. **Size**: the shorter side is resized to ``size`` (bilinear, PIL's antialiased filter),
   then the centre ``size x size`` square is cropped - upstream DiffAE's
   ``Resize(size) -> CenterCrop(size)`` transform. Faces should be FFHQ-aligned beforehand for
   the released FFHQ models.
5. **Tensor**: ``float32`` ``(3, size, size)`` in ``[-1, 1]`` (``x / 127.5 - 1``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ipl_diffusion.errors import UserError, UserFileNotFoundError

__all__ = ["IMAGE_EXTENSIONS", "check_image_file", "check_image_tensor", "list_image_files", "load_image", "load_images", "to_pil", "to_rgb"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

ImageInput = Union[str, os.PathLike, Image.Image]


def list_image_files(folder: Union[str, os.PathLike], option: str | None = None) -> List[Path]:
    """Image files (by extension, case-insensitive) directly in ``folder``, sorted by name.

    ``option``: how the caller's user gave the folder (``"--target_images"``, ``"target_images="``),
    named in the refusals, since a run can take several image folders.

    Raises:
        UserFileNotFoundError: (a ``FileNotFoundError``) ``folder`` does not exist, is not a
            folder, or holds no image files; the message names the path, ``option`` and the
            extensions looked for.
    """
    path = Path(folder)
    given = f" (given as {option})" if option else ""
    expected = f"a folder of images ({', '.join(IMAGE_EXTENSIONS)})"
    if not path.exists():
        raise UserFileNotFoundError(f"image folder '{path}'{given} does not exist; expected {expected}")
    if not path.is_dir():
        raise UserFileNotFoundError(f"'{path}'{given} is not a folder; expected {expected}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UserFileNotFoundError(f"no image files found in '{path}'{given}; expected {expected}")
    return files


def _open(path: Path, decode: bool = True) -> Image.Image:
    """``path`` opened with PIL and decoded (``decode=False``: only verified, see
    :func:`check_image_file`); every failure a ``UserError`` naming the file."""
    if not path.exists():
        raise UserFileNotFoundError(f"image file '{path}' does not exist")
    if path.is_dir():
        raise UserError(f"'{path}' is a folder, not an image file (use load_images for folders)")
    try:
        image = Image.open(path)  # reads the header; refuses a decompression bomb by its size
        if decode:
            image.load()  # decode now so truncated / corrupt data fails here, naming the file
        elif image.format in ("JPEG", "MPO"):
            # PIL's verify reads no JPEG data; a 1/8-scale draft decode reads all of it, cheaply.
            image.draft(image.mode, (1, 1))
            image.load()
        else:
            image.verify()  # the file's structure (e.g. PNG chunk checksums), no pixels kept
    except Image.DecompressionBombError as err:
        raise UserError(
            f"image '{path}' is too large to load safely ({err}). Downscale it first, or raise "
            "PIL.Image.MAX_IMAGE_PIXELS yourself if you trust the file."
        ) from err
    except MemoryError:
        raise
    except Exception as err:  # PIL decoders raise many types (OSError, SyntaxError, struct.error, ...)
        reason = f"{err}" if isinstance(err, (UnidentifiedImageError, OSError)) else f"{type(err).__name__}: {err}"
        raise UserError(f"cannot read image '{path}': {reason}") from err
    return image


def _upright(image: Image.Image, name: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as err:  # a malformed EXIF block should not cost the pixels
        warnings.warn(f"ignoring unreadable EXIF orientation of image '{name}': {err}", UserWarning)
        return image


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        scale = 255.0 if array.size and np.nanmax(array) <= 1.0 else 1.0
    else:  # I;16, I;16B, I;16L, I;16N, I: 16-bit data
        scale = 255.0 / 65535.0
    array = np.nan_to_num(array * scale, nan=0.0)
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: Tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring, step 3)."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _check_mode(mode: str, name: str) -> None:
    """Refuse a mode :func:`to_rgb` cannot convert, by converting a 1x1 image of it (no pixels
    of the file needed)."""
    try:
        to_rgb(Image.new(mode, (1, 1)))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot convert image '{name}' ({mode}) to RGB: {err}") from err


def check_image_file(path: Union[str, os.PathLike]) -> None:
    """Refuse now a file :func:`load_image` would refuse later, without decoding its pixels: the
    same opening (missing file, a folder, not an image, a decompression bomb) and mode check,
    with PIL's ``verify`` of the file's structure in place of decoding (JPEG, which ``verify``
    does not read: decoded at 1/8 scale, so truncated data is found). For a check of many files
    before a slow step (``ipl adapt`` checks its image folders before loading the model); damage
    ``verify`` cannot see in other formats is still refused by the load, naming the file.

    Raises:
        UserFileNotFoundError: (a ``FileNotFoundError``) the file does not exist.
        UserError: (a ``ValueError``) unreadable / corrupt / too large file, a folder, or a
            mode that cannot become RGB; the message names the file.
    """
    path = Path(path)
    image = _open(path, decode=False)
    image.close()
    _check_mode(image.mode, str(path))


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if (width, height) != (size, size):
        # torchvision's Resize(int): the shorter side becomes `size`, the longer keeps the ratio.
        if width <= height:
            new = (size, max(size, int(size * height / width)))
        else:
            new = (max(size, int(size * width / height)), size)
        image = image.resize(new, Image.Resampling.BILINEAR)
        width, height = image.size
        left = int(round((width - size) / 2.0))
        top = int(round((height - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return image


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise UserError(f"size must be a positive integer (pixels); got {size!r}")
    return int(size)


def load_image(
    image: ImageInput,
    size: int,
    background: Tuple[int, int, int] = (255, 255, 255),
) -> torch.Tensor:
    """Load one image as model input.

    Args:
        image: a file path or a ``PIL.Image`` of any mode and size.
        size: output side in pixels.
        background: RGB colour transparent pixels are composited on (white).

    Returns:
        ``float32`` tensor ``(3, size, size)`` in ``[-1, 1]``.

    Raises:
        UserFileNotFoundError: (a ``FileNotFoundError``) the path does not exist.
        UserError: (a ``ValueError``) unreadable / corrupt / too large file (the message names it), a folder
            instead of a file, or a bad ``size``.
    """
    size = _check_size(size)
    if isinstance(image, Image.Image):
        name = "<PIL image>"
        pil = image
    elif isinstance(image, (str, os.PathLike)):
        name = str(image)
        pil = _open(Path(image))
    else:
        raise UserError(f"expected an image path or a PIL.Image; got {type(image).__name__}")
    pil = _upright(pil, name)
    try:
        pil = _resize_center_crop(to_rgb(pil, background), size)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot convert image '{name}' ({pil.mode}, {pil.size}): {err}") from err
    array = np.asarray(pil, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_images(
    source: Union[str, os.PathLike, Sequence[ImageInput]],
    size: int,
    on_error: str = "raise",
    background: Tuple[int, int, int] = (255, 255, 255),
) -> Tuple[torch.Tensor, List[str]]:
    """Load a folder (its image files, sorted by name), one file, or a list of paths / PIL images.

    Args:
        source: folder, image file, or sequence of paths / ``PIL.Image``.
        size: output side in pixels.
        on_error: ``"raise"`` (default) stops at the first unreadable file with a ``UserError``
            naming it; ``"skip"`` leaves unreadable files out and reports them in one
            ``UserWarning``.
        background: see :func:`load_image`.

    Returns:
        ``(images, names)``: ``float32`` ``(B, 3, size, size)`` in ``[-1, 1]`` and, per image, its
        file name (``image_{i}`` for PIL inputs).

    Raises:
        UserFileNotFoundError: (a ``FileNotFoundError``) missing or empty folder, or a missing
            file in the list.
        UserError: (a ``ValueError``) unreadable image with ``on_error="raise"``, no readable
            image at all, an empty list, or a bad ``on_error``.
    """
    if on_error not in ("raise", "skip"):
        raise UserError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
    size = _check_size(size)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        items: List[ImageInput] = [path] if path.is_file() else list(list_image_files(path))
    else:
        items = list(source)
        if not items:
            raise UserError("load_images got an empty list of images")
    tensors, names, skipped = [], [], []
    for i, item in enumerate(items):
        name = Path(item).name if isinstance(item, (str, os.PathLike)) else f"image_{i}"
        try:
            tensors.append(load_image(item, size, background))
        except ValueError as err:
            if on_error == "raise":
                raise
            skipped.append(str(err))
            continue
        names.append(name)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s):\n  " + "\n  ".join(skipped), UserWarning)
    if not tensors:
        raise UserError(f"none of the {len(items)} image(s) could be read: {'; '.join(skipped)}")
    return torch.stack(tensors), names


def check_image_tensor(images: torch.Tensor) -> torch.Tensor:
    """Images given as a tensor: ``(3, H, W)`` or ``(B, 3, H, W)`` float in ``[-1, 1]``.

    Returns:
        ``float32`` ``(B, 3, H, W)`` (a batch axis added to a single image), values unchanged.

    Raises:
        UserError: (a ``ValueError``) another shape, NaN / inf values, or values outside ``[-1, 1]`` (with
            1e-3 slack for rounding), e.g. ``[0, 255]`` images; the message says how to map them.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"image tensors must be (B, 3, H, W) in [-1, 1]; got {tuple(images.shape)}")
    images = images.float()
    if not torch.isfinite(images).all():
        raise UserError("image tensors contain NaN or infinite values")
    low, high = images.min().item(), images.max().item()
    if low < -1.001 or high > 1.001:
        raise UserError(
            f"image tensors must be in [-1, 1]; got values in [{low:.3g}, {high:.3g}] "
            "(map [0, 255] images with x / 127.5 - 1)"
        )
    return images


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """``(B, 3, H, W)`` or ``(3, H, W)`` tensors in ``[-1, 1]`` -> list of 8-bit RGB PIL images.

    Values are clamped to ``[-1, 1]`` and rounded; NaNs become black.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 3, H, W); got {tuple(images.shape)}")
    array = images.detach().float().cpu().nan_to_num(-1.0).clamp(-1, 1).add(1).mul(127.5).round()
    array = array.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in array]


# What a pipeline call returns (diffusers' names; "latent": the raw (B, 3, H, W) in [-1, 1]).
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def prepare_images(images, size: int, device) -> torch.Tensor:
    """The pipelines' one input path: a folder, a path, a PIL image, a list of paths / PIL
    images (any mode and size, through :func:`load_images`), or a ``(B, 3, H, W)`` /
    ``(3, H, W)`` tensor already in ``[-1, 1]`` (checked by :func:`check_image_tensor`) ->
    ``(B, 3, size, size)`` float32 in ``[-1, 1]`` on ``device``.

    Raises:
        UserError: a tensor with NaN / inf or outside ``[-1, 1]``, an unreadable image;
        UserFileNotFoundError: a missing or empty folder.
    """
    if torch.is_tensor(images):  # NaN or [0, 255] tensors would translate into garbage silently
        return check_image_tensor(images).to(device, torch.float32)
    if not isinstance(images, (list, tuple, str, os.PathLike)):
        images = [images]
    return load_images(images, size)[0].to(device, torch.float32)


def postprocess_images(images: torch.Tensor, output_type: str = "pil"):
    """The pipelines' one output path: ``(B, 3, H, W)`` in ``[-1, 1]`` -> ``"pil"`` (list of
    RGB images), ``"np"`` (``(B, H, W, 3)`` float32 in ``[0, 1]``), ``"pt"`` (``(B, 3, H, W)`` in
    ``[0, 1]``) through diffusers' ``VaeImageProcessor.postprocess``, or ``"latent"`` (unchanged).

    Raises:
        UserError: an unknown ``output_type``.
    """
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
    if output_type == "latent":
        return images
    from diffusers.image_processor import VaeImageProcessor

    images = images.detach().float().cpu().nan_to_num(-1.0).clamp(-1, 1)
    return VaeImageProcessor(do_resize=False).postprocess(images, output_type=output_type)
