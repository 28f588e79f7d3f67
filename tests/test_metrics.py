"""Unit tests of cyclegan.metrics: label scores, L1, FID, KID and feature extraction, on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cyclegan.metrics import (
    ConfusionMatrix,
    InceptionFeatures,
    colors_to_classes,
    extract_features,
    feature_statistics,
    fid_from_features,
    fid_from_statistics,
    kid_from_features,
    l1_distance,
    label_scores,
)

PALETTE = torch.tensor(
    [[0, 0, 0], [128, 64, 128], [70, 130, 180], [255, 255, 255]], dtype=torch.uint8
)


def _label_image(ids: torch.Tensor) -> torch.Tensor:
    """Class ids (N, H, W) drawn in palette colours as (N, 3, H, W) images in [-1, 1]."""
    return PALETTE[ids].permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _with_exact_stats(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n samples whose empirical mean and (unbiased) covariance are exactly ``mean`` and ``cov``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, mean.shape[0], generator=g, dtype=torch.float64)
    x = x - x.mean(dim=0)
    whiten = torch.linalg.cholesky(torch.cov(x.T))
    x = torch.linalg.solve_triangular(whiten, x.T, upper=False).T
    return x @ torch.linalg.cholesky(cov).T + mean


def _small_extractor(dim: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, dim, 3, stride=2, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


# --- labels ---------------------------------------------------------------------------------


def test_colors_to_classes_exact_colours():
    ids = torch.randint(0, len(PALETTE), (2, 5, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(colors_to_classes(_label_image(ids), PALETTE), ids)


def test_colors_to_classes_noisy_colours():
    ids = torch.randint(0, len(PALETTE), (2, 8, 8), generator=torch.Generator().manual_seed(1))
    # +-20 of 255 per channel, far less than half the distance between any two palette colours.
    noise = (torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) - 0.5) * (
        40 / 127.5
    )
    images = (_label_image(ids) + noise).clamp(-1, 1)
    assert torch.equal(colors_to_classes(images, PALETTE.long()), ids)


def test_colors_to_classes_rejects_bad_palette():
    with pytest.raises(ValueError, match="palette"):
        colors_to_classes(torch.zeros(1, 3, 2, 2), torch.zeros(4, 4))


def test_confusion_and_scores_hand_computed():
    true = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0])
    cm = ConfusionMatrix(3)
    cm.update(pred, true)
    # rows: truth, columns: prediction
    assert cm.matrix.tolist() == [[3, 1, 0], [0, 2, 1], [1, 0, 2]]
    assert cm.matrix.dtype == torch.int64
    scores = label_scores(cm)
    # per-pixel: diag 3+2+2 of 10 pixels
    assert scores["per_pixel_acc"] == pytest.approx(0.7)
    # per-class: 3/4, 2/3, 2/3 -> 25/36
    assert scores["per_class_acc"] == pytest.approx(25 / 36)
    # IoU: 3/(4+4-3), 2/(3+3-2), 2/(3+3-2) = 3/5, 1/2, 1/2 -> 8/15
    assert scores["class_iou"] == pytest.approx(8 / 15)


def test_scores_skip_absent_classes_and_ignore_label():
    true = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 255, 255])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 3, 0])
    cm = ConfusionMatrix(5)  # classes 3 and 4 never appear; 255 is ignored
    cm.update(pred, true)
    scores = label_scores(cm)
    assert scores["per_pixel_acc"] == pytest.approx(0.7)
    assert scores["per_class_acc"] == pytest.approx(25 / 36)
    assert scores["class_iou"] == pytest.approx(8 / 15)

    # A class only predicted counts in IoU (as 0) but not in per-class accuracy.
    cm2 = ConfusionMatrix(5)
    cm2.update(torch.tensor([0, 0, 1, 1, 3]), torch.tensor([0, 0, 1, 1, 1]))
    scores2 = label_scores(cm2)
    assert scores2["per_class_acc"] == pytest.approx((1 + 2 / 3) / 2)
    assert scores2["class_iou"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_perfect_prediction_and_merge():
    ids = torch.randint(0, 4, (3, 6, 6), generator=torch.Generator().manual_seed(3))
    a, b = ConfusionMatrix(4), ConfusionMatrix(4)
    a.update(ids[:2], ids[:2])
    b.update(ids[2:], ids[2:])
    merged = a + b
    assert int(merged.matrix.sum()) == ids.numel()
    assert label_scores(merged) == {"per_pixel_acc": 1.0, "per_class_acc": 1.0, "class_iou": 1.0}
    assert label_scores(merged.matrix)["class_iou"] == 1.0  # a plain tensor works too


def test_confusion_errors_name_the_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="pred_classes"):
        cm.update(torch.tensor([5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="no pixels"):
        label_scores(cm)
    with pytest.raises(ValueError, match="merge"):
        cm.merge(ConfusionMatrix(4))


def test_l1_distance_in_pixel_units():
    real = torch.full((2, 3, 4, 4), -1.0)
    assert l1_distance(real, real) == 0.0
    assert l1_distance(torch.ones_like(real), real) == pytest.approx(1.0)
    assert l1_distance(torch.zeros_like(real), real) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        l1_distance(real, real[:1])


# --- FID ------------------------------------------------------------------------------------


def test_fid_of_set_with_itself_is_zero():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(5))
    assert abs(fid_from_features(x, x)) < 1e-8
    # Fewer samples than dimensions: a singular covariance must not give NaN or a negative.
    y = torch.randn(10, 64, generator=torch.Generator().manual_seed(6))
    fid = fid_from_features(y, y)
    # Round-off in the null space is relative to the covariance's trace (about 64 here).
    assert math.isfinite(fid) and abs(fid) < 1e-5 * feature_statistics(y)[1].trace().item()


def test_fid_matches_closed_form_for_diagonal_gaussians():
    mu1 = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, -0.5], dtype=torch.float64)
    s1 = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    s2 = torch.tensor([4.0, 0.5, 0.5, 1.0], dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    x = _with_exact_stats(300, mu1, torch.diag(s1), seed=7)
    y = _with_exact_stats(500, mu2, torch.diag(s2), seed=8)
    assert fid_from_features(x, y) == pytest.approx(expected.item(), rel=1e-9)
    assert fid_from_statistics(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(
        expected.item(), rel=1e-9
    )


def test_fid_general_covariances_and_symmetry():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(6), b @ b.T + 0.1 * torch.eye(6)
    mu1 = torch.randn(6, generator=g, dtype=torch.float64)
    mu2 = torch.randn(6, generator=g, dtype=torch.float64)
    # tr sqrt(S1 S2) from the eigenvalues of the (non-symmetric) product, an independent route.
    tr_covmean = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    expected = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    assert fid_from_statistics(mu1, s1, mu2, s2) == pytest.approx(expected.item(), rel=1e-8)

    x = torch.randn(100, 8, generator=g)
    y = torch.randn(150, 8, generator=g) * 1.5 + 0.3
    assert fid_from_features(x, y) == pytest.approx(fid_from_features(y, x), rel=1e-9)
    assert fid_from_features(x, y) > 0.5


def test_feature_statistics_and_errors():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(10))
    mu, sigma = feature_statistics(x)
    assert mu.dtype == torch.float64 and sigma.shape == (3, 3)
    assert torch.allclose(sigma, torch.cov(x.double().T))
    with pytest.raises(ValueError, match="features1"):
        fid_from_features(x[:1], x)
    with pytest.raises(ValueError, match="dimension"):
        fid_from_features(x, x[:, :2])


# --- KID ------------------------------------------------------------------------------------


def test_kid_identical_vs_shifted():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(400, 16, generator=g)
    y = torch.randn(400, 16, generator=g)
    same_mean, same_std = kid_from_features(x, y, subsets=20, subset_size=100)
    shifted_mean, _ = kid_from_features(x, y + 1.0, subsets=20, subset_size=100)
    assert abs(same_mean) < 0.02
    assert same_std >= 0
    assert shifted_mean > 0.5
    assert shifted_mean > 20 * abs(same_mean)


def test_kid_matches_direct_formula_on_one_full_subset():
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(6, 3, generator=g).double(), torch.randn(6, 3, generator=g).double()
    d, m = 3, 6

    def k(a, b):
        return (a @ b / d + 1) ** 3

    # Unbiased MMD^2 written out term by term (a subset of all samples is a permutation of them).
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kid_from_features(x, y, subsets=3, subset_size=m)
    assert mean == pytest.approx((xx + yy - 2 * xy).item(), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_kid_deterministic_for_seeded_generator():
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(100, 8, generator=g), torch.randn(120, 8, generator=g) + 0.2

    def run(seed: int) -> tuple[float, float]:
        return kid_from_features(
            x, y, subsets=10, subset_size=50, generator=torch.Generator().manual_seed(seed)
        )

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert kid_from_features(x, y, subsets=10, subset_size=50) == kid_from_features(
        x, y, subsets=10, subset_size=50
    )
    with pytest.raises(ValueError, match="subset_size"):
        kid_from_features(x, y, subset_size=101)


# --- feature extraction and evaluation ------------------------------------------------------


def test_inception_features_random_weights_shape():
    torch.manual_seed(0)
    extractor = InceptionFeatures(pretrained=False)
    with torch.no_grad():
        features = extractor(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert features.shape == (2, 2048)
    assert torch.isfinite(features).all()


def test_inception_features_loads_local_weights(tmp_path):
    torch.manual_seed(0)
    source = InceptionFeatures(pretrained=False)
    # Store a torchvision-style state dict (with an fc head) and read it back from disk.
    state = {k.removeprefix("net."): v for k, v in source.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    loaded = InceptionFeatures(weights_path=path)
    images = torch.rand(1, 3, 75, 75) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(images), source(images))
    with pytest.raises(ValueError, match="weights_path"):
        InceptionFeatures(weights_path=path, pretrained=False)


def test_extract_features_rejects_bad_batches():
    with pytest.raises(TypeError, match="batch 0"):
        extract_features(_small_extractor(), [[1, 2, 3]], "cpu")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no batches"):
        extract_features(_small_extractor(), [], "cpu")
