"""Export a generator as TorchScript and ONNX, for serving without this code base.

    python -m pipeline.export --model NAME --out exported/              # G_A (A->B) of a run
    python -m pipeline.export --model runs:/RUN_ID --direction BtoA --out exported/ --size 128
    python -m pipeline.export --model horse2zebra.pth --out exported/ --formats torchscript

Writes ``generator_<direction>.torchscript.pt``, ``generator_<direction>.onnx`` and
``generator_<direction>.json`` (architecture, source, input contract), then runs each exported
model next to the eager one on a ``--size`` square batch and on a second batch of another,
odd size, and prints the largest absolute difference. ONNX needs the packages ``onnx`` and
``onnxscript`` (``pip install onnx onnxscript``); ``onnxruntime`` is used to check the result
when it is installed.

Serving the exported model
--------------------------
Input: float32 NCHW, RGB, values in [-1, 1] (``pixels / 127.5 - 1``), any batch size and any
height and width (at least 4 px for ONNX); the output has the input's shape, in [-1, 1]
(``(out + 1) * 127.5`` gives 8-bit pixels). Sides that are not a multiple of 4 are padded and
cropped back inside the model.

TorchScript, in Python (``torch`` only) or C++ (libtorch, ``torch::jit::load``)::

    import numpy as np, torch
    from PIL import Image
    net = torch.jit.load("generator_AtoB.torchscript.pt").eval()
    x = torch.from_numpy(np.asarray(Image.open("in.jpg").convert("RGB"))).permute(2, 0, 1)
    x = x[None].float() / 127.5 - 1
    with torch.no_grad():
        y = net(x)
    out = ((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(out).save("out.png")

ONNX Runtime (``pip install onnxruntime``, or ``onnxruntime-gpu`` with
``providers=["CUDAExecutionProvider"]``); the input is called ``image``, the output ``output``::

    import onnxruntime as ort
    session = ort.InferenceSession("generator_AtoB.onnx", providers=["CPUExecutionProvider"])
    y = session.run(["output"], {"image": x.numpy()})[0]

The ONNX file also serves from NVIDIA Triton (``platform: "onnxruntime_onnx"``, input ``image``
with dims ``[3, -1, -1]`` and ``max_batch_size`` > 0), and TensorRT builds engines from it
(``trtexec --onnx=generator_AtoB.onnx`` with ``--minShapes/--optShapes/--maxShapes`` for
``image``). For batches of files or a dataset, ``python -m pipeline.translate`` runs the
generator on Ray without exporting it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pipeline import exit_with
from pipeline.flags import add_model_flags, arch_from_flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.export",
        description="Export a generator as TorchScript and ONNX, checked against PyTorch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_model_flags(p)
    p.add_argument("--direction", default="AtoB", choices=("AtoB", "BtoA"), help="default AtoB")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=256, help="side of the check image (default 256)")
    p.add_argument("--formats", help="comma-separated: torchscript, onnx (default both)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing, so that --help loads nothing heavy (tests/test_help.py).
    from pipeline.exporters import FORMATS, ExportError, check_formats, export
    from pipeline.models import ModelSourceError, load_generator
    from pipeline.storage import redact

    given = FORMATS if args.formats is None else args.formats.split(",")
    formats = [f.strip() for f in given if f.strip()]
    try:
        check_formats(formats)
        arch = arch_from_flags(args)
        net, cfg, info = load_generator(
            args.model,
            args.direction,
            storage=args.storage,
            arch=arch,
            trust_pickle=args.trust_pickle,
        )
        print(f"[export] {args.direction} generator of {args.model} ({info['kind']}): {cfg}")
        result = export(
            net,
            args.out,
            direction=args.direction,
            size=args.size,
            formats=formats,
            metadata={
                "source": args.model,
                "kind": info["kind"],
                "step": info.get("step"),
                "mlflow_run_id": info.get("mlflow_run_id"),
                "architecture": dataclasses.asdict(cfg),
            },
        )
    except (ModelSourceError, ValueError, ExportError) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    for fmt, path in result["files"].items():
        print(f"[export] {fmt}: {path}")
        for label, diff in result["max_abs_diff"][fmt].items():
            shown = "not checked (onnxruntime not installed)" if diff is None else f"{diff:.2e}"
            print(f"[export]   input {label}: max abs diff vs PyTorch {shown}")
    print(f"[export] metadata: {result['metadata']}")
    return 0


if __name__ == "__main__":
    exit_with(main())
