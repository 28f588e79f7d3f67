"""The row labels of the training sample grid (``pipeline.images.label_rows``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cyclegan.transforms import image_grid
from pipeline.images import label_rows

ROWS = ("real_A", "fake_B", "rec_A", "real_B", "fake_A", "rec_B")


def sample_grid(size: int = 32, per_row: int = 2) -> np.ndarray:
    """A grid as the training loop builds it: six rows of NCHW images in [-1, 1]."""
    gen = torch.Generator().manual_seed(0)
    return image_grid([torch.rand(per_row, 3, size, size, generator=gen) * 2 - 1 for _ in ROWS])


def test_labelled_grid_has_a_narrow_margin_and_keeps_the_images():
    grid = sample_grid()
    labelled = label_rows(grid, ROWS)
    margin = labelled.shape[1] - grid.shape[1]
    assert labelled.shape[0] == grid.shape[0] and labelled.dtype == np.uint8
    assert 0 < margin < 64, margin
    np.testing.assert_array_equal(labelled[:, margin:], grid)


def test_each_row_carries_its_own_label_on_a_white_margin():
    grid = sample_grid()
    labelled = label_rows(grid, ROWS)
    margin = labelled.shape[1] - grid.shape[1]
    row_height = grid.shape[0] // len(ROWS)
    strips = [labelled[i * row_height : (i + 1) * row_height, :margin] for i in range(len(ROWS))]
    for name, strip in zip(ROWS, strips, strict=True):
        assert (strip[0, 0] == 255).all() and (strip[-1, -1] == 255).all(), name
        ink = (strip != 255).any(axis=2)
        assert ink.sum() > 20, f"row {name}: no label drawn"
        # The text stays inside its own row, clear of the strip's edges.
        assert not ink[0].any() and not ink[-1].any(), name
    # Different names give different pixels: each row is labelled with its own name.
    assert not np.array_equal(strips[0], strips[1])
    assert not np.array_equal(strips[0], strips[3])


def test_the_same_label_is_drawn_the_same_in_every_row():
    grid = sample_grid()
    labelled = label_rows(grid, ["same"] * len(ROWS))
    row_height = grid.shape[0] // len(ROWS)
    margin = labelled.shape[1] - grid.shape[1]
    first = labelled[:row_height, :margin]
    for i in range(1, len(ROWS)):
        np.testing.assert_array_equal(
            labelled[i * row_height : (i + 1) * row_height, :margin], first
        )


def test_rows_that_do_not_split_evenly_are_refused():
    grid = sample_grid()
    with pytest.raises(ValueError, match="equal rows"):
        label_rows(grid[:-1], ROWS)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        label_rows(grid.astype(np.float32), ROWS)
