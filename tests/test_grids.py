"""The one labelled grid (ipl_diffusion.grids): nearest-neighbour upscaling, labels, layout."""

import numpy as np
import pytest
import torch

from ipl_diffusion.grids import labelled_grid


def test_tiles_are_upscaled_without_blur_and_rows_are_labelled():
    gen = torch.Generator().manual_seed(0)
    rows = [torch.rand(3, 3, 8, 8, generator=gen) * 2 - 1 for _ in range(2)]
    plain = np.asarray(labelled_grid(rows, min_tile=96))
    labelled = np.asarray(labelled_grid(rows, ["source", "adapted"], ["0", "1", "2"], min_tile=96))
    scale = 12  # smallest whole factor that makes an 8-px tile >= 96 px
    assert plain.shape[0] == 2 * 8 * scale + 2 * 4 and plain.shape[1] == 3 * 8 * scale + 3 * 4
    tile = plain[: 8 * scale, : 8 * scale]
    expected = ((rows[0][0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    # nearest neighbour: every 12x12 block is one source pixel, exactly
    np.testing.assert_array_equal(tile, np.repeat(np.repeat(expected, scale, 0), scale, 1))
    # labels add a margin on the left and on top, drawn in black on white
    assert labelled.shape[0] > plain.shape[0] and labelled.shape[1] > plain.shape[1]
    left = labelled[:, : labelled.shape[1] - plain.shape[1]]
    assert (left < 100).any()


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="at least one row"):
        labelled_grid([])
    with pytest.raises(ValueError, match="row labels"):
        labelled_grid([torch.zeros(1, 3, 4, 4)], ["a", "b"])
    with pytest.raises(ValueError, match="one size"):
        labelled_grid([torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 8)])


def test_image_grid_is_seamless_at_the_images_size_and_wraps_rows():
    """``ipl sample``'s grid: ``columns`` images to a row, touching, at their own size, the last
    row's empty cells white; PIL images and tensors give the same pixels."""
    from PIL import Image

    from ipl_diffusion.grids import image_grid

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (5, 6, 4, 3), dtype=np.uint8)  # 5 images, 6 high, 4 wide
    grid = np.asarray(image_grid([Image.fromarray(t) for t in tiles], columns=3))
    assert grid.shape == (2 * 6, 3 * 4, 3)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(grid[r * 6 : (r + 1) * 6, c * 4 : (c + 1) * 4], tile)
    assert (grid[6:, 2 * 4 :] == 255).all()  # the sixth cell is empty
    as_tensor = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_array_equal(np.asarray(image_grid(as_tensor, columns=3)), grid)
    assert np.asarray(image_grid(as_tensor, columns=8)).shape == (6, 5 * 4, 3)  # one row when it fits
