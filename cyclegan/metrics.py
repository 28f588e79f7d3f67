"""Evaluation metrics: paired label scores (photo->labels), L1 (labels->photo), FID and KID.

Images everywhere are float NCHW in [-1, 1], as the generators produce them. Feature-based
metrics take any ``nn.Module`` that maps such images to ``(N, D)`` features; ``InceptionFeatures``
is the usual one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import Inception_V3_Weights, inception_v3

# ---------------------------------------------------------------------------------------------
# Paired label metrics (the Cityscapes photo->labels evaluation of pix2pix / CycleGAN)
# ---------------------------------------------------------------------------------------------


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name}: expected images of shape (N, 3, H, W), got {tuple(images.shape)}"
        )


def colors_to_classes(images: torch.Tensor, palette: torch.Tensor) -> torch.Tensor:
    """Class id of every pixel: the index of the nearest palette colour (squared RGB distance).

    ``images`` are (N, 3, H, W) in [-1, 1]; ``palette`` is (K, 3) with values in 0..255 (uint8 or
    any numeric dtype). Returns a LongTensor (N, H, W) of ids in 0..K-1.
    """
    _check_images(images, "images")
    if palette.dim() != 2 or palette.shape[1] != 3 or palette.shape[0] == 0:
        raise ValueError(f"palette: expected shape (K, 3) with K >= 1, got {tuple(palette.shape)}")
    colors = palette.to(device=images.device, dtype=torch.float32)
    if colors.min() < 0 or colors.max() > 255:
        raise ValueError("palette: colour values must lie in 0..255")
    pixels = (images.float() + 1.0) * 127.5
    # One colour at a time keeps memory at O(N*H*W) instead of O(N*K*H*W).
    best_dist = torch.full_like(pixels[:, 0], float("inf"))
    best_id = torch.zeros(best_dist.shape, dtype=torch.long, device=images.device)
    for k, color in enumerate(colors):
        dist = (pixels - color.view(1, 3, 1, 1)).square().sum(dim=1)
        closer = dist < best_dist
        best_dist = torch.where(closer, dist, best_dist)
        best_id[closer] = k
    return best_id


class ConfusionMatrix:
    """A K x K int64 count matrix: rows are true classes, columns predicted classes.

    Pixels whose true id lies outside 0..K-1 (e.g. an ignore label of 255) are skipped, as in the
    reference evaluation. Matrices from several workers or batches combine by ``merge`` (or ``+``).
    """

    def __init__(self, num_classes: int, matrix: torch.Tensor | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes: must be >= 1, got {num_classes}")
        if matrix is None:
            matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        elif matrix.shape != (num_classes, num_classes):
            raise ValueError(
                f"matrix: expected shape ({num_classes}, {num_classes}), got {tuple(matrix.shape)}"
            )
        self.num_classes = num_classes
        self.matrix = matrix.to(device="cpu", dtype=torch.int64)

    def update(self, pred_classes: torch.Tensor, true_classes: torch.Tensor) -> None:
        """Count every pixel of integer maps ``pred_classes`` against ``true_classes``."""
        if pred_classes.shape != true_classes.shape:
            raise ValueError(
                f"pred_classes {tuple(pred_classes.shape)} and true_classes "
                f"{tuple(true_classes.shape)} differ in shape"
            )
        k = self.num_classes
        pred = pred_classes.reshape(-1).long().cpu()
        true = true_classes.reshape(-1).long().cpu()
        valid = (true >= 0) & (true < k)
        pred, true = pred[valid], true[valid]
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"pred_classes: ids must lie in 0..{k - 1}")
        self.matrix += torch.bincount(true * k + pred, minlength=k * k).view(k, k)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """A new matrix holding the counts of both."""
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"other: cannot merge {other.num_classes} classes into {self.num_classes}"
            )
        return ConfusionMatrix(self.num_classes, self.matrix + other.matrix)

    __add__ = merge


def label_scores(confusion: ConfusionMatrix | torch.Tensor) -> dict[str, float]:
    """Per-pixel accuracy, mean per-class accuracy and mean class IoU of a confusion matrix.

    per-class acc = diag / row sum, averaged over classes present in the ground truth;
    IoU = diag / (row + col - diag), averaged over classes present in ground truth or prediction.
    Over a full evaluation set every class is present, and these equal the reference numbers.
    """
    hist = confusion.matrix if isinstance(confusion, ConfusionMatrix) else confusion
    if hist.dim() != 2 or hist.shape[0] != hist.shape[1]:
        raise ValueError(f"confusion: expected a square matrix, got {tuple(hist.shape)}")
    hist = hist.double()
    total = hist.sum()
    if total == 0:
        raise ValueError("confusion: no pixels counted")
    diag, rows, cols = hist.diagonal(), hist.sum(dim=1), hist.sum(dim=0)
    in_truth = rows > 0
    union = rows + cols - diag
    in_either = union > 0
    return {
        "per_pixel_acc": (diag.sum() / total).item(),
        "per_class_acc": (diag[in_truth] / rows[in_truth]).mean().item(),
        "class_iou": (diag[in_either] / union[in_either]).mean().item(),
    }


def l1_distance(fake: torch.Tensor, real: torch.Tensor) -> float:
    """Mean absolute error between two image batches in [-1, 1], reported in [0, 1] pixel units."""
    if fake.shape != real.shape:
        raise ValueError(f"fake {tuple(fake.shape)} and real {tuple(real.shape)} differ in shape")
    return ((fake.double() - real.double()).abs().mean() / 2.0).item()


# ---------------------------------------------------------------------------------------------
# FID and KID on features
# ---------------------------------------------------------------------------------------------


def _check_features(features: torch.Tensor, name: str, min_count: int = 2) -> None:
    if features.dim() != 2:
        raise ValueError(f"{name}: expected features of shape (N, D), got {tuple(features.shape)}")
    if features.shape[0] < min_count:
        raise ValueError(f"{name}: need at least {min_count} samples, got {features.shape[0]}")


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix; round-off negatives become 0."""
    eigvals, eigvecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    _check_features(features, "features")
    x = features.double()
    return x.mean(dim=0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def fid_from_statistics(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), where tr((S1 S2)^(1/2)) is computed
    as tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the same eigenvalues, but of a symmetric matrix.
    """
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in shape: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
            f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}"
        )
    mu1, mu2, sigma1, sigma2 = (t.double().cpu() for t in (mu1, mu2, sigma1, sigma2))
    sqrt1 = _sqrt_psd(sigma1)
    inner = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    fid = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return fid.item()


def fid_from_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Fréchet Inception Distance between two feature sets (N1, D) and (N2, D)."""
    _check_features(features1, "features1")
    _check_features(features2, "features2")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(
            f"features1 has dimension {features1.shape[1]}, features2 {features2.shape[1]}"
        )
    return fid_from_statistics(*feature_statistics(features1), *feature_statistics(features2))


def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3, for equal-sized x and y."""
    d, m = x.shape[1], x.shape[0]
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    off_diag = (k_xx.sum() - k_xx.diagonal().sum()) + (k_yy.sum() - k_yy.diagonal().sum())
    return off_diag / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def kid_from_features(
    features1: torch.Tensor,
    features2: torch.Tensor,
    subsets: int = 100,
    subset_size: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased polynomial MMD^2 over subsets.

    Each subset draws ``subset_size`` samples without replacement from each set (default:
    min(1000, N1, N2)). Without a ``generator`` a fixed seed (0) is used, so repeated calls agree.
    """
    _check_features(features1, "features1")
    _check_features(features2, "features2")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(
            f"features1 has dimension {features1.shape[1]}, features2 {features2.shape[1]}"
        )
    n1, n2 = features1.shape[0], features2.shape[0]
    if subsets < 1:
        raise ValueError(f"subsets: must be >= 1, got {subsets}")
    if subset_size is None:
        subset_size = min(1000, n1, n2)
    if not 2 <= subset_size <= min(n1, n2):
        raise ValueError(
            f"subset_size: must lie in 2..{min(n1, n2)} (the set sizes), got {subset_size}"
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    x, y = features1.double().cpu(), features2.double().cpu()
    mmds = torch.empty(subsets, dtype=torch.float64)
    for i in range(subsets):
        idx1 = torch.randperm(n1, generator=generator)[:subset_size]
        idx2 = torch.randperm(n2, generator=generator)[:subset_size]
        mmds[i] = _polynomial_mmd2(x[idx1], y[idx2])
    # Population std, as torch-fidelity reports it.
    return mmds.mean().item(), mmds.std(unbiased=False).item()


# ---------------------------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------------------------


class InceptionFeatures(nn.Module):
    """The 2048-d pool3 features of torchvision's Inception v3, for images in [-1, 1].

    Weights come from ``weights_path`` (a torchvision ``inception_v3`` state dict on disk), else
    from torchvision's download (``Inception_V3_Weights.DEFAULT``); ``pretrained=False`` keeps a
    random init, which is only good for tests. torchvision's weights were ported from TensorFlow
    and expect (p - 0.5) / 0.5 of [0, 1] pixels, which is what ImageNet normalisation followed by
    torchvision's ``transform_input`` computes; images in [-1, 1] are exactly that already, so
    they go in unchanged with ``transform_input=False``. These weights are not those of the
    original TensorFlow FID network, so scores compare across runs of this code, not with
    published numbers.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        pretrained: bool = True,
        resize_to: int = 299,
    ) -> None:
        super().__init__()
        if weights_path is not None and not pretrained:
            raise ValueError(f"weights_path={weights_path!s} given with pretrained=False")
        if weights_path is not None:
            net = inception_v3(
                weights=None, aux_logits=False, transform_input=False, init_weights=False
            )
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            # The auxiliary classifier is only used in training; drop it from the stored weights.
            state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
            net.load_state_dict(state)
        elif pretrained:
            net = inception_v3(
                weights=Inception_V3_Weights.DEFAULT, aux_logits=False, transform_input=False
            )
        else:
            net = inception_v3(
                weights=None, aux_logits=False, transform_input=False, init_weights=True
            )
        net.fc = nn.Identity()
        self.net = net.eval()
        self.resize_to = resize_to

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 2048) features."""
        _check_images(images, "images")
        if images.shape[-2:] != (self.resize_to, self.resize_to):
            images = F.interpolate(
                images, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False
            )
        return self.net(images)


def _batches(images: Iterable[torch.Tensor], name: str) -> Iterator[torch.Tensor]:
    for i, batch in enumerate(images):
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"{name}: batch {i} is a {type(batch).__name__}, expected a Tensor")
        _check_images(batch, f"{name}[{i}]")
        yield batch


class _EvalMode:
    """Puts modules in eval mode for a block and restores each one's previous mode after."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.was_training = [m.training for m in modules]

    def __enter__(self) -> None:
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in zip(self.modules, self.was_training, strict=True):
            m.train(mode)


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    images: Iterable[torch.Tensor],
    device: torch.device | str,
    generator: nn.Module | None = None,
) -> torch.Tensor:
    """Features (N, D) on CPU of all image batches, first translated by ``generator`` if given."""
    modules = (extractor,) if generator is None else (extractor, generator)
    chunks = []
    with _EvalMode(*modules):
        for batch in _batches(images, "images"):
            batch = batch.to(device=device, dtype=torch.float32)
            if generator is not None:
                batch = generator(batch).float()
            features = extractor(batch)
            if features.dim() != 2 or features.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"extractor: expected ({batch.shape[0]}, D) features, "
                    f"got {tuple(features.shape)}"
                )
            chunks.append(features.float().cpu())
    if not chunks:
        raise ValueError("images: no batches")
    return torch.cat(chunks)
