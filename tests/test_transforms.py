"""Preprocessing: the bicubic resize against PIL's, the preprocess modes, crop/flip, to_input."""

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan.config import AugmentConfig
from cyclegan.transforms import (
    crop_params,
    eval_view,
    random_crop_flip,
    resize_bicubic,
    resize_for_load,
    to_input,
)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with noise: like a photo, unlike pure noise (where kernels differ most)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], axis=-1)
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "src, size",
    [((300, 300), (286, 286)), ((53, 37), (8, 8)), ((40, 30), (200, 53)), ((7, 5), (1, 1))],
)
def test_bicubic_resize_matches_pil_within_two_levels(src, size):
    img = _photo(*src)
    ours = resize_bicubic(img, size)
    pil = np.asarray(img.resize(size, Image.BICUBIC))
    assert ours.shape == (size[1], size[0], 3) and ours.dtype == np.uint8
    assert ours.flags["C_CONTIGUOUS"] and ours.flags["WRITEABLE"]
    diff = np.abs(ours.astype(int) - pil.astype(int))
    assert diff.max() <= 2
    assert diff.mean() < 0.1


def test_bicubic_resize_to_the_same_size_keeps_the_pixels():
    img = _photo(30, 20)
    np.testing.assert_array_equal(resize_bicubic(img, (30, 20)), np.asarray(img))
    arr = np.asarray(img)  # an array in, too (read-only arrays are copied, not refused)
    np.testing.assert_array_equal(resize_bicubic(arr, (30, 20)), arr)


def test_preprocess_modes_give_the_expected_sizes():
    img = _photo(120, 60)
    cfg = AugmentConfig(load_size=64, crop_size=48)
    assert resize_for_load(img, cfg).shape == (64, 64, 3)
    scaled = AugmentConfig(load_size=64, crop_size=48, preprocess="scale_width_and_crop")
    assert resize_for_load(img, scaled).shape == (48, 64, 3)  # 32 px high would be < the crop
    tall = _photo(10, 400)
    assert resize_for_load(tall, scaled).shape == (256, 64, 3)  # capped at 4x the width
    for mode in ("crop", "none"):
        out = resize_for_load(img, AugmentConfig(load_size=64, crop_size=48, preprocess=mode))
        np.testing.assert_array_equal(out, np.asarray(img))
    assert eval_view(img, cfg).shape == (48, 48, 3)


def test_crop_and_flip_follow_the_drawn_parameters():
    cfg = AugmentConfig(load_size=8, crop_size=4)
    img = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    params = np.array([[0.0, 0.0, 0.9], [0.999, 0.999, 0.1]])  # top-left unflipped; corner flipped
    out = random_crop_flip([img, img], params, cfg).numpy()
    np.testing.assert_array_equal(out[0], img[:4, :4])
    np.testing.assert_array_equal(out[1], img[4:, 4:][:, ::-1])
    np.testing.assert_array_equal(crop_params(5, (1, 2)), crop_params(5, (1, 2)))
    assert not np.array_equal(crop_params(5, (1, 2)), crop_params(5, (1, 3)))
    with pytest.raises(ValueError, match="data.crop_size"):
        random_crop_flip([img[:3]], params[:1], cfg)


def test_to_input_scales_to_minus_one_one_in_either_memory_format():
    batch = torch.tensor([0, 255, 128], dtype=torch.uint8).repeat(2, 4, 4, 1)  # NHWC
    x = to_input(batch)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    assert x[0, 0].eq(-1).all() and x[0, 1].eq(1).all()
    assert abs(x[0, 2, 0, 0].item() - (128 / 127.5 - 1)) < 1e-6
    y = to_input(batch, channels_last=True)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, y)
