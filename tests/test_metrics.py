"""Unit tests of cyclegan.metrics: label scores, L1, FID, KID (against closed forms and against
torchmetrics run on images), the Inception weights files and feature extraction, on CPU."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception_v3

from cyclegan.metrics import (
    FID_INCEPTION,
    TORCHVISION_INCEPTION,
    ConfusionMatrix,
    InceptionFeatures,
    colors_to_classes,
    extract_features,
    fid_from_features,
    kid_from_features,
    l1_distance,
    label_scores,
    load_inception,
)
from cyclegan.networks import ResnetGenerator

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


def _fid_closed_form(mu1, s1, mu2, s2) -> float:
    """FID of two Gaussians by another route than torchmetrics' eigenvalues of S1 S2: those of
    the symmetric S1^(1/2) S2 S1^(1/2), which are the same."""
    w, v = torch.linalg.eigh(s1)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    tr_covmean = torch.linalg.eigvalsh(root @ s2 @ root).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean).item()


def test_fid_of_set_with_itself_is_zero():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(5))
    assert abs(fid_from_features(x, x)) < 1e-8
    # Fewer samples than dimensions: a singular covariance must not give NaN or a negative.
    y = torch.randn(10, 64, generator=torch.Generator().manual_seed(6))
    fid = fid_from_features(y, y)
    # Round-off in the null space is relative to the covariance's trace (about 64 here).
    assert math.isfinite(fid) and abs(fid) < 1e-5 * torch.cov(y.double().T).trace().item()


def test_fid_matches_closed_form_for_diagonal_gaussians():
    mu1 = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, -0.5], dtype=torch.float64)
    s1 = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    s2 = torch.tensor([4.0, 0.5, 0.5, 1.0], dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    x = _with_exact_stats(300, mu1, torch.diag(s1), seed=7)
    y = _with_exact_stats(500, mu2, torch.diag(s2), seed=8)
    assert fid_from_features(x, y) == pytest.approx(expected.item(), rel=1e-9)


def test_fid_general_covariances_and_symmetry():
    g = torch.Generator().manual_seed(9)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(6), b @ b.T + 0.1 * torch.eye(6)
    mu1 = torch.randn(6, generator=g, dtype=torch.float64)
    mu2 = torch.randn(6, generator=g, dtype=torch.float64)
    x = _with_exact_stats(100, mu1, s1, seed=10)
    y = _with_exact_stats(150, mu2, s2, seed=11)
    assert fid_from_features(x, y) == pytest.approx(_fid_closed_form(mu1, s1, mu2, s2), rel=1e-8)

    x = torch.randn(100, 8, generator=g)
    y = torch.randn(150, 8, generator=g) * 1.5 + 0.3
    assert fid_from_features(x, y) == pytest.approx(fid_from_features(y, x), rel=1e-9)
    assert fid_from_features(x, y) > 0.5


def test_fid_errors_name_the_input():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(10))
    with pytest.raises(ValueError, match="features1"):
        fid_from_features(x[:1], x)
    with pytest.raises(ValueError, match="dimension"):
        fid_from_features(x, x[:, :2])
    with pytest.raises(ValueError, match=re.escape("features2: expected features of shape (N, D)")):
        fid_from_features(x, x[None])


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


def test_kid_repeatable_by_seed_and_leaves_the_global_stream_alone():
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(100, 8, generator=g), torch.randn(120, 8, generator=g) + 0.2

    def run(seed: int) -> tuple[float, float]:
        return kid_from_features(x, y, subsets=10, subset_size=50, seed=seed)

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert kid_from_features(x, y, subsets=10, subset_size=50) == run(0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(5)
    assert torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError, match="subset_size"):
        kid_from_features(x, y, subset_size=101)
    with pytest.raises(ValueError, match="subsets"):
        kid_from_features(x, y, subsets=0)


# --- the same as torchmetrics run on the images ---------------------------------------------

# torchmetrics used as its documentation says (the extractor as the metric's ``feature`` module,
# fed one batch at a time), against this module's path (features extracted first, then scored).
# Both run the same float32 net on the same batches, so the features are bit-identical; what
# differs is the arithmetic after that. U32 is float32's unit round-off.
U32 = 2.0**-24


def _two_image_sets() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20)
    real = torch.rand(24, 3, 16, 16, generator=g) * 2 - 1
    fake = (torch.rand(20, 3, 16, 16, generator=g) * 1.2 - 0.2).clamp(-1, 1)
    return real, fake


def test_fid_equals_torchmetrics_run_on_the_images():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net, (real, fake) = _small_extractor(), _two_image_sets()
    reference = FrechetInceptionDistance(feature=net, normalize=True, input_img_size=(3, 16, 16))
    for batch in real.split(8):
        reference.update(batch, real=True)
    for batch in fake.split(8):
        reference.update(batch, real=False)
    expected = reference.compute()
    real_features = extract_features(net, real.split(8), "cpu")
    fake_features = extract_features(net, fake.split(8), "cpu")
    ours = fid_from_features(fake_features, real_features)
    # Both accumulate the sums in float64 (only their order differs: relative ~N * 2^-53), but
    # torchmetrics rounds its result to the features' float32 (relative U32); ours stays float64.
    # So they agree to U32 relative, doubled to cover the float64 residue.
    assert expected.dtype == torch.float32 and ours > 0.01
    assert ours == pytest.approx(expected.item(), rel=2 * U32, abs=0)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_equals_torchmetrics_run_on_the_images():
    from torchmetrics.image.kid import KernelInceptionDistance

    net, (real, fake) = _small_extractor(), _two_image_sets()
    subsets, m = 6, 12
    reference = KernelInceptionDistance(feature=net, subsets=subsets, subset_size=m, normalize=True)
    for batch in real.split(8):
        reference.update(batch, real=True)
    for batch in fake.split(8):
        reference.update(batch, real=False)
    torch.manual_seed(7)  # torchmetrics draws its subsets from the global generator
    expected_mean, expected_std = (v.item() for v in reference.compute())
    real_features = extract_features(net, real.split(8), "cpu")
    fake_features = extract_features(net, fake.split(8), "cpu")
    mean, std = kid_from_features(fake_features, real_features, subsets, m, seed=7)
    # torchmetrics computes the kernels of the float32 features in float32, ours in float64.
    # Features here are >= 0 (ReLU, then averages), so a kernel (a.b / d + 1)^3 carries a
    # relative error of at most (d + 2) U32 from the dot product, scale and sum, times 3 from
    # the cube, plus 2 U32 for its two products; a mean of m^2 such values adds m^2 U32 at worst
    # (naive summation). MMD^2 = mean k_xx + mean k_yy - 2 mean k_xy weighs three such means
    # with 4 in all, each value at most k_max. The std moves by no more than its values do.
    all_features = torch.cat([real_features, fake_features]).double()
    d = all_features.shape[1]
    k_max = ((all_features @ all_features.T / d + 1) ** 3).max().item()
    bound = 4 * (3 * (d + 2) + 2 + m * m) * U32 * k_max
    assert abs(mean - expected_mean) <= bound + U32 * abs(expected_mean)
    assert abs(std - expected_std) <= bound + U32 * abs(expected_std)
    # The bound is tight enough to see another draw of the subsets.
    other, _ = kid_from_features(fake_features, real_features, subsets, m, seed=8)
    assert abs(other - expected_mean) > bound + U32 * abs(expected_mean)


# --- the Inception networks -----------------------------------------------------------------


def fid_inception_file(folder: Path) -> Path:
    """A state dict with the FID network's names and shapes (torchvision's Inception v3 with the
    TensorFlow graph's 1008 classes), randomly initialised: the real weights are a download."""
    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    path = folder / "pt_inception-2015-12-05-test.pth"
    torch.save(net.state_dict(), path)
    return path


def test_fid_inception_from_a_weights_file_is_torch_fidelitys_network(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = fid_inception_file(tmp_path)
    extractor = load_inception(path)
    assert extractor.network == FID_INCEPTION
    # 8-bit pixels as files hold them, and the same pixels in [-1, 1] as the data loader gives.
    pixels = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    images = pixels.float() / 127.5 - 1
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path))
    extractor.train()  # stays in eval mode: batch norm keeps its statistics
    assert not extractor.training and not extractor.net.training
    with torch.no_grad():
        features = extractor(images)
        assert torch.equal(features, reference(pixels)[0])
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert features.std() > 0


def test_torchvision_inception_from_a_weights_file(tmp_path):
    torch.manual_seed(0)
    # As torchvision stores it: with the auxiliary classifier, 1000 ImageNet classes.
    net = inception_v3(weights=None, aux_logits=True, init_weights=True)
    path = tmp_path / "inception_v3_google.pth"
    torch.save(net.state_dict(), path)
    extractor = load_inception(path)
    assert extractor.network == TORCHVISION_INCEPTION
    net.fc = nn.Identity()
    images = torch.rand(1, 3, 75, 75) * 2 - 1
    with torch.no_grad():
        expected = net.eval()(F.interpolate(images, size=(299, 299), mode="bilinear"))
        assert torch.equal(extractor(images), expected)


def test_wrong_weights_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.pth: no such file"):
        load_inception(tmp_path / "missing.pth")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match=r"notes\.txt: not a PyTorch state dict file"):
        load_inception(tmp_path / "notes.txt")
    torch.save(ResnetGenerator(3, 3, 4, 1).state_dict(), tmp_path / "G.pth")
    with pytest.raises(ValueError, match=r"G\.pth: not an Inception v3 state dict"):
        load_inception(tmp_path / "G.pth")
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "ten.pth")
    with pytest.raises(ValueError, match=r"ten\.pth: an Inception v3 with 10 classes"):
        load_inception(tmp_path / "ten.pth")
    head = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    torch.save(head, tmp_path / "head.pth")
    with pytest.raises(ValueError, match=r"head\.pth: does not fit FID Inception.*Missing key"):
        load_inception(tmp_path / "head.pth")
    with pytest.raises(ValueError, match=r"a list"):
        InceptionFeatures([1, 2], "a list")  # type: ignore[arg-type]


def test_extract_features_rejects_bad_batches_and_counts_progress():
    with pytest.raises(TypeError, match="batch 0"):
        extract_features(_small_extractor(), [[1, 2, 3]], "cpu")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no batches"):
        extract_features(_small_extractor(), [], "cpu")
    done: list[int] = []
    images = torch.rand(7, 3, 8, 8) * 2 - 1
    features = extract_features(_small_extractor(), images.split(3), "cpu", progress=done.append)
    assert done == [3, 3, 1] and features.shape == (7, 8)
