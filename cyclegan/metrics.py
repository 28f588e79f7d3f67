"""Evaluation metrics: paired label scores (photo->labels), L1 (labels->photo), FID and KID.

Images everywhere are float NCHW in [-1, 1], as the generators produce them. FID and KID are
torchmetrics' on features of any ``nn.Module`` that maps such images to ``(N, D)`` features;
``InceptionFeatures`` with the FID network's weights gives scores comparable with published ones.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

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
# FID and KID on features (torchmetrics)
# ---------------------------------------------------------------------------------------------


def _check_features(features: torch.Tensor, name: str, min_count: int = 2) -> None:
    if features.dim() != 2:
        raise ValueError(f"{name}: expected features of shape (N, D), got {tuple(features.shape)}")
    if features.shape[0] < min_count:
        raise ValueError(f"{name}: need at least {min_count} samples, got {features.shape[0]}")


def _check_pair(features1: torch.Tensor, features2: torch.Tensor) -> None:
    _check_features(features1, "features1")
    _check_features(features2, "features2")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(
            f"features1 has dimension {features1.shape[1]}, features2 {features2.shape[1]}"
        )


class _GivenFeatures(nn.Module):
    """The "feature extractor" torchmetrics runs on features extracted beforehand: it passes them
    on as float64, so that both metrics do all their arithmetic in float64."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim  # read by FrechetInceptionDistance instead of probing the net

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.detach().to(device="cpu", dtype=torch.float64)


def fid_from_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Fréchet Inception Distance between generated features (N1, D) and real ones (N2, D), by
    torchmetrics' ``FrechetInceptionDistance`` in float64 (the distance is symmetric)."""
    _check_pair(features1, features2)
    from torchmetrics.image.fid import FrechetInceptionDistance  # takes seconds to import

    # sync_on_compute=False: rank 0 scores alone inside a DDP job, and a metric that gathered its
    # state from every rank would wait forever for the others.
    metric = FrechetInceptionDistance(
        feature=_GivenFeatures(features1.shape[1]), sync_on_compute=False
    )
    metric.update(features2, real=True)
    metric.update(features1, real=False)
    return metric.compute().item()


def kid_from_features(
    features1: torch.Tensor,
    features2: torch.Tensor,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance between generated features (N1, D) and real ones (N2, D): mean
    and population std of the unbiased MMD^2 with the kernel (a.b / D + 1)^3 over ``subsets``
    draws, by torchmetrics' ``KernelInceptionDistance`` in float64.

    Each draw takes ``subset_size`` samples without replacement from each set (default
    min(1000, N1, N2)) from the random stream seeded with ``seed``, so repeated calls agree; the
    caller's stream is left as it was.
    """
    _check_pair(features1, features2)
    n1, n2 = features1.shape[0], features2.shape[0]
    if subsets < 1:
        raise ValueError(f"subsets: must be >= 1, got {subsets}")
    if subset_size is None:
        subset_size = min(1000, n1, n2)
    if not 2 <= subset_size <= min(n1, n2):
        raise ValueError(
            f"subset_size: must lie in 2..{min(n1, n2)} (the set sizes), got {subset_size}"
        )
    from torchmetrics.image.kid import KernelInceptionDistance  # takes seconds to import

    with warnings.catch_warnings():
        # It warns that it keeps every feature; here they are in memory already.
        warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save")
        metric = KernelInceptionDistance(
            feature=_GivenFeatures(features1.shape[1]),
            subsets=subsets,
            subset_size=subset_size,
            sync_on_compute=False,  # as in fid_from_features
        )
    metric.update(features2, real=True)
    metric.update(features1, real=False)
    # torchmetrics draws its subsets from the global CPU generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return mean.item(), std.item()


# ---------------------------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------------------------

FID_INCEPTION = "FID Inception v3 (TensorFlow 2015-12-05)"
TORCHVISION_INCEPTION = "torchvision Inception v3"
# Where torchmetrics and torch-fidelity download the FID network's weights by default: the
# 2015-12-05 weights that pytorch-fid ships as pt_inception-2015-12-05-6726825d.pth.
FID_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
# The two networks have the same parameter names; the TensorFlow graph classifies into 1008
# classes, torchvision's into ImageNet's 1000.
_NETWORK_OF_CLASSES = {1008: FID_INCEPTION, 1000: TORCHVISION_INCEPTION}


def inception_network(state_dict: object, source: str) -> str:
    """Which Inception v3 a state dict holds (``FID_INCEPTION`` or ``TORCHVISION_INCEPTION``),
    told by its classifier; raises ``ValueError`` naming ``source`` for anything else."""
    fc = state_dict.get("fc.weight") if isinstance(state_dict, dict) else None
    if not isinstance(fc, torch.Tensor) or fc.dim() != 2 or fc.shape[1] != 2048:
        found = "no 'fc.weight'" if not isinstance(fc, torch.Tensor) else tuple(fc.shape)
        what = "a dict" if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(
            f"{source}: not an Inception v3 state dict ({what} with {found}; expected "
            "'fc.weight' of shape (1008, 2048), as in pt_inception-2015-12-05-*.pth, or "
            "(1000, 2048), as in torchvision's inception_v3)"
        )
    if fc.shape[0] not in _NETWORK_OF_CLASSES:
        raise ValueError(
            f"{source}: an Inception v3 with {fc.shape[0]} classes; expected 1008 (the FID "
            "network, pt_inception-2015-12-05-*.pth) or 1000 (torchvision's inception_v3)"
        )
    return _NETWORK_OF_CLASSES[fc.shape[0]]


def read_inception_weights(path: str | os.PathLike[str]) -> tuple[dict, str]:
    """The state dict stored in ``path`` (loaded with ``weights_only=True``) and which network it
    holds; ``ValueError`` naming the file when it is missing or is something else."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (expected an Inception v3 state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a PyTorch state dict file ({reason})") from None
    return state, inception_network(state, str(path))


class InceptionFeatures(nn.Module):
    """The 2048-d pool3 features of an Inception v3, for images in [-1, 1]; the state dict
    decides which network (``self.network``):

    - ``FID_INCEPTION``: torch-fidelity's port of the TensorFlow 2015-12-05 graph that FID and
      KID were defined on (``pt_inception-2015-12-05-*.pth``). Images are quantised to 8 bits as
      saved files would be, then the net resizes them to 299 as TensorFlow 1.x did: the scores
      compare with published ones.
    - ``TORCHVISION_INCEPTION``: torchvision's ``inception_v3`` (ImageNet weights). Its weights
      expect (p - 0.5) / 0.5 of [0, 1] pixels, which images in [-1, 1] already are, so they go
      in unchanged after a bilinear resize to 299. Scores compare across runs of this code only.

    The net stays in eval mode whatever ``train()`` is asked: batch norm keeps its statistics.
    """

    def __init__(self, state_dict: dict, source: str = "state dict") -> None:
        super().__init__()
        self.network = inception_network(state_dict, source)
        try:
            if self.network == FID_INCEPTION:
                from torch_fidelity.feature_extractor_inceptionv3 import (
                    FeatureExtractorInceptionV3,
                )

                # Its constructor unpickles a file with weights_only=False; hand it the tensors,
                # already loaded safely, serialised afresh.
                buffer = io.BytesIO()
                torch.save(state_dict, buffer)
                buffer.seek(0)
                net = FeatureExtractorInceptionV3(
                    "inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer
                )
            else:
                # Imported here: torchvision takes ~1 s, which a run scoring labels never needs.
                from torchvision.models import inception_v3

                net = inception_v3(
                    weights=None, aux_logits=False, transform_input=False, init_weights=False
                )
                # The auxiliary classifier is only used in training.
                net.load_state_dict(
                    {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
                )
                net.fc = nn.Identity()
        except RuntimeError as exc:  # missing, unexpected or misshapen tensors
            reason = str(exc).strip().splitlines()
            raise ValueError(
                f"{source}: does not fit {self.network}: {' '.join(reason[:2])[:500]}"
            ) from None
        self.net = net.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 2048) features."""
        _check_images(images, "images")
        if self.network == FID_INCEPTION:
            # Rounded: p / 127.5 - 1 and back lands a hair below p for some pixels.
            pixels = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            return self.net(pixels)[0]
        if images.shape[-2:] != (299, 299):
            images = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net(images)


def load_inception(weights_path: str | os.PathLike[str] | None = None) -> InceptionFeatures:
    """:class:`InceptionFeatures` from a state dict file, or without one the FID network's
    weights from ``FID_WEIGHTS_URL`` (downloaded once into torch hub's cache)."""
    if weights_path is not None:
        state, _ = read_inception_weights(weights_path)
        return InceptionFeatures(state, str(weights_path))
    state = torch.hub.load_state_dict_from_url(
        FID_WEIGHTS_URL, map_location="cpu", progress=False, weights_only=True
    )
    return InceptionFeatures(state, FID_WEIGHTS_URL)


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
    progress: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Features (N, D) on CPU of all image batches, first translated by ``generator`` if given;
    ``progress`` is called with the size of each batch done."""
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
            if progress is not None:
                progress(batch.shape[0])
    if not chunks:
        raise ValueError("images: no batches")
    return torch.cat(chunks)
