"""The one image preprocessing path (ipl_diffusion.images): odd modes, sizes, files, missing folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from ipl_diffusion.images import list_image_files, load_image, load_images, to_pil

RED = torch.tensor([1.0, -1.0, -1.0])
BLUE = torch.tensor([-1.0, -1.0, 1.0])


def pixel(t, y, x):
    return t[:, y, x]


def test_rgb_values_and_range():
    image = Image.new("RGB", (4, 4), (255, 0, 128))
    out = load_image(image, 4)
    assert out.shape == (3, 4, 4) and out.dtype == torch.float32
    assert torch.allclose(pixel(out, 0, 0), torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 1), (255, 0, 0, 255))
    out = load_image(image, 4)
    assert torch.allclose(pixel(out, 0, 0), torch.ones(3))  # white background
    assert torch.allclose(pixel(out, 1, 1), RED)


def test_palette_with_transparency_and_grayscale_and_cmyk():
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((2, 2), 1)
    out = load_image(pal, 4)
    assert torch.allclose(pixel(out, 0, 0), torch.ones(3)) and torch.allclose(pixel(out, 2, 2), RED)

    gray = load_image(Image.new("L", (4, 4), 255), 4)
    assert torch.allclose(gray, torch.ones(3, 4, 4))
    cmyk = load_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), 4)  # no ink = white
    assert torch.allclose(cmyk, torch.ones(3, 4, 4))


def test_16bit_images_are_scaled_not_clipped():
    data = np.array([[0, 32768], [65535, 65535]], dtype=np.uint16)
    i16 = Image.fromarray(data)
    assert i16.mode.startswith("I;16")
    out = load_image(i16, 2)
    assert out[0, 0, 0] == -1.0 and out[0, 1, 0] == 1.0
    assert abs(out[0, 0, 1].item() - (128 / 127.5 - 1)) < 1e-6  # mid-grey, not white
    i32 = Image.fromarray(data.astype(np.int32))
    assert i32.mode == "I"
    assert torch.equal(load_image(i32, 2), out)
    f = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert abs(load_image(f, 2)[0, 0, 0].item() - (128 / 127.5 - 1)) < 1e-6


def test_16bit_png_file_round_trip(tmp_path):
    data = np.full((4, 4), 65535, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(data).save(path)
    assert torch.allclose(load_image(path, 4), torch.ones(3, 4, 4))


def test_non_square_resize_shorter_side_then_centre_crop():
    image = Image.new("RGB", (12, 4), (0, 0, 255))
    for x in range(4, 8):
        for y in range(4):
            image.putpixel((x, y), (255, 0, 0))
    out = load_image(image, 4)  # shorter side already 4: centre 4 columns are the red band
    assert out.shape == (3, 4, 4)
    assert torch.allclose(out, RED[:, None, None].expand(3, 4, 4))
    big = load_image(Image.new("RGB", (40, 20), (0, 0, 255)), 8)
    assert big.shape == (3, 8, 8) and torch.allclose(big, BLUE[:, None, None].expand(3, 8, 8))


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (8, 4), (0, 0, 255))
    for x in range(4):
        for y in range(4):
            image.putpixel((x, y), (255, 0, 0))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=100)
    out = load_image(path, 4)
    # upright it is 4 wide, 8 tall with red on top; the centre crop keeps 2 red rows on top
    assert (out[:, 0, :] - RED[:, None]).abs().max() < 0.1
    assert (out[:, 3, :] - BLUE[:, None]).abs().max() < 0.1


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(bad, 4)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated, 4)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png", 4)
    with pytest.raises(ValueError, match="size"):
        load_image(Image.new("RGB", (4, 4)), 0)


def test_decompression_bomb_gives_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64*64 > 2 * 100: a "bomb"
    with pytest.raises(ValueError, match="huge.png.*too large"):
        load_image(path, 4)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.*expected a folder of images"):
        load_images(tmp_path / "does-not-exist", 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no image files found in .*empty"):
        load_images(empty, 4)
    with pytest.raises(FileNotFoundError):
        list_image_files(empty)


def test_folder_loading_sorted_and_skip_mode(tmp_path):
    Image.new("RGB", (6, 6), (255, 0, 0)).save(tmp_path / "b.png")
    Image.new("LA", (6, 4), (0, 255)).save(tmp_path / "a.png")
    (tmp_path / "c.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="c.jpg"):
        load_images(tmp_path, 4)
    with pytest.warns(UserWarning, match="(?s)skipped 1 unreadable.*c.jpg"):
        images, names = load_images(tmp_path, 4, on_error="skip")
    assert names == ["a.png", "b.png"] and images.shape == (2, 3, 4, 4)
    assert torch.allclose(images[1], RED[:, None, None].expand(3, 4, 4))
    assert torch.allclose(images[0], -torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="on_error"):
        load_images(tmp_path, 4, on_error="ignore")


def test_list_of_pil_and_to_pil_round_trip():
    src = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    images, names = load_images([src, src.convert("L")], 8)
    assert names == ["image_0", "image_1"]
    back = to_pil(images)
    assert np.array_equal(np.asarray(back[0]), np.asarray(src))
    assert to_pil(images[0])[0].size == (8, 8)
    assert np.asarray(to_pil(torch.full((3, 2, 2), float("nan")))[0]).max() == 0


def test_check_image_file_refuses_what_load_image_refuses_without_decoding(tmp_path):
    from ipl_diffusion.images import check_image_file

    Image.new("RGB", (64, 48), (1, 2, 3)).save(tmp_path / "ok.jpg")
    Image.new("I;16", (8, 8)).save(tmp_path / "deep.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "truncated.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "truncated.png").read_bytes()[:60])
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])  # PIL's verify skips JPEG data
    for good in ("ok.jpg", "deep.png"):
        check_image_file(tmp_path / good)
        load_image(tmp_path / good, 4)
    for bad in ("broken.png", "truncated.png", "truncated.jpg"):
        for check in (check_image_file, lambda path: load_image(path, 4)):
            with pytest.raises(ValueError, match=bad):
                check(tmp_path / bad)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        check_image_file(tmp_path / "nope.png")
