"""Export a generator as TorchScript and ONNX, checked against the eager model (see
``python -m pipeline.export --help`` for how to serve the files)."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

FORMATS = ("torchscript", "onnx")
ONNX_PACKAGES = ("onnx", "onnxscript")
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """An export that cannot be done here (a missing package, an unsupported model)."""


class PaddedGenerator(nn.Module):
    """The generator with its pad-to-4 step written without branching on the input's shape.

    ``ResnetGenerator.forward`` pads only when a side is not a multiple of 4, a branch that
    ``torch.export`` (and so the ONNX exporter) would fix to the example's shape. Here the input
    is always reflection-padded by ``(-side) % 4`` (often 0) and the output always cropped by a
    negative pad, so one graph serves every size of at least 4 px. Same numbers as the original.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net.model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = (-image.shape[-2]) % 4, (-image.shape[-1]) % 4
        out = self.model(F.pad(image, (0, pad_w, 0, pad_h), mode="reflect"))
        return F.pad(out, (0, -pad_w, 0, -pad_h))


def missing_onnx_packages() -> list[str]:
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def check_formats(formats: list[str]) -> None:
    """Fail before any work when a format is unknown or its packages are missing."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"--formats: {', '.join(unknown) or 'none'}; choose from {FORMATS}")
    if "onnx" in formats and (missing := missing_onnx_packages()):
        raise ExportError(
            f"ONNX export needs the package(s) {' and '.join(missing)}, not installed here: "
            f"pip install {' '.join(missing)} (and onnxruntime to check the exported model), "
            "or export TorchScript only with --formats torchscript"
        )


def test_inputs(size: int, channels: int, seed: int = 0) -> list[torch.Tensor]:
    """A ``size`` square batch of 1 and a batch of 2 at another, odd, non-square size."""
    gen = torch.Generator().manual_seed(seed)
    other = (max(5, size // 2 + 3), max(7, size * 3 // 4 + 1))
    return [
        torch.rand(1, channels, size, size, generator=gen) * 2 - 1,
        torch.rand(2, channels, *other, generator=gen) * 2 - 1,
    ]


def export_torchscript(net: nn.Module, path: str) -> str:
    """``torch.jit.script`` keeps the pad/crop branch of forward, so any size works (tracing
    would freeze the example's shape: a 30 px input would come out 32 px)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of torch.export
        scripted = torch.jit.script(net)
    scripted.save(path)
    return path


def run_torchscript(path: str, x: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(path, map_location="cpu")
    with torch.no_grad():
        return module(x)


def export_onnx(net: nn.Module, path: str, example: torch.Tensor) -> str:
    """ONNX through torch.export (the default exporter) with dynamic batch, height, width."""
    check_formats(["onnx"])
    wrapped = PaddedGenerator(net).eval()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapped,
            (example,),
            input_names=["image"],
            output_names=["output"],
            dynamic_axes={"image": axes, "output": axes},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(path)
    import onnx

    onnx.checker.check_model(path)
    return path


def run_onnx(path: str, x: torch.Tensor) -> torch.Tensor | None:
    """The ONNX model's output with onnxruntime, or None when it is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["output"], {"image": x.numpy()})[0])


def export(
    net: nn.Module,
    out_dir: str,
    *,
    direction: str = "AtoB",
    size: int = 256,
    formats: list[str] | tuple[str, ...] = FORMATS,
    metadata: dict | None = None,
) -> dict:
    """Export ``net`` to ``out_dir`` in ``formats`` and check each against the eager net.

    Returns ``{"files": {format: path}, "max_abs_diff": {format: {"HxW": diff or None}},
    "metadata": path}``; a diff is None where it could not be checked (no onnxruntime).
    Raises :class:`ExportError` when a check exceeds 1e-4.
    """
    # Long on purpose: each format is written and then checked against the eager model in the same place.
    formats = list(formats)
    check_formats(formats)
    if size < 4:
        raise ValueError(f"--size: must be >= 4, got {size}")
    if not isinstance(getattr(net, "model", None), nn.Sequential):
        raise ExportError(f"cannot export a {type(net).__name__}: expected a ResnetGenerator")
    net = net.eval().cpu()
    os.makedirs(out_dir, exist_ok=True)
    channels = net.model[1].in_channels
    inputs = test_inputs(size, channels)
    with torch.no_grad():
        expected = [net(x) for x in inputs]
    stem = os.path.join(out_dir, f"generator_{direction}")
    files, diffs = {}, {}
    for fmt in formats:
        if fmt == "torchscript":
            files[fmt] = export_torchscript(net, stem + ".torchscript.pt")
            outputs = [run_torchscript(files[fmt], x) for x in inputs]
        else:
            files[fmt] = export_onnx(net, stem + ".onnx", inputs[1])
            outputs = [run_onnx(files[fmt], x) for x in inputs]
        diffs[fmt] = {}
        for x, want, got in zip(inputs, expected, outputs, strict=True):
            label = f"{x.shape[0]}x{x.shape[2]}x{x.shape[3]}"
            if got is None:
                diffs[fmt][label] = None
                continue
            if got.shape != want.shape:
                raise ExportError(
                    f"{files[fmt]}: output shape {tuple(got.shape)} for input "
                    f"{tuple(x.shape)}, expected {tuple(want.shape)}"
                )
            diffs[fmt][label] = (got - want).abs().max().item()
            if diffs[fmt][label] > TOLERANCE:
                raise ExportError(
                    f"{files[fmt]}: differs from the eager model by {diffs[fmt][label]:.2e} "
                    f"on a {label} input (tolerance {TOLERANCE:g})"
                )
    meta_path = stem + ".json"
    meta = {
        **(metadata or {}),
        "direction": direction,
        "files": {fmt: os.path.basename(p) for fmt, p in files.items()},
        "input": {
            "name": "image",
            "layout": "NCHW",
            "dtype": "float32",
            "channels": channels,
            "range": [-1.0, 1.0],
            "min_side_onnx": 4,
        },
        "output": {"name": "output", "layout": "NCHW", "range": [-1.0, 1.0]},
        "max_abs_diff": diffs,
    }
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return {"files": files, "max_abs_diff": diffs, "metadata": meta_path}


# CLI
