"""Translate many images with a trained generator, as Ray Data batch inference.

    python -m pipeline.translate --model NAME --direction AtoB --input photos/ --output out/
    python -m pipeline.translate --model runs:/RUN_ID --direction BtoA \\
        --input s3://bucket/horse2zebra --split testB --output s3://bucket/h2z-fake-A
    python -m pipeline.translate --model latest_net_G_A.pth --direction AtoB \\
        --input in.jpg --output out/ --load-size 512
    ray job submit --working-dir . -- python -m pipeline.translate --model NAME \\
        --direction AtoB --input s3://bucket/in --output s3://bucket/out --num-actors 4

``--input`` is a folder of images (read recursively: .jpg .jpeg .png .webp .bmp .tif .tiff),
one image file, or a dataset root written by ``pipeline.prepare``/``pipeline.synth`` (then
``--split`` names the dataset; default testA for AtoB, testB for BtoA). Each output goes to
``--output`` under the input's key (its path inside the folder or dataset) in the input's
format (JPEG, PNG, WEBP; other formats become .png), or all as ``--format png`` (or jpeg,
webp), the extension changed to match. Images keep their size
unless ``--load-size N`` first scales the shorter side to N; any size works (the generator pads
to a multiple of 4 and crops back).

The generator is loaded once on the driver and shipped to a pool of actors through the object
store, so actors need no access to the checkpoint store or MLflow; each actor holds it once and
writes its outputs itself (on a cluster of several machines, write to object storage). With
GPUs in the cluster each actor takes ``--num-gpus-per-actor`` (default 1) and there is one
actor per GPU; without, one CPU actor holding all CPUs but one (``--num-actors`` to change
either). Unreadable images are
skipped, listed, and make the exit status 1; the others are still written.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import exit_with
from pipeline.flags import add_address_flag, add_model_flags, arch_from_flags, run_command

OUTPUT_FORMATS = ("same", "png", "jpeg", "webp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.translate",
        description="Translate a folder, an image or a dataset split with Ray Data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    add_model_flags(p)
    p.add_argument("--direction", required=True, choices=("AtoB", "BtoA"))
    p.add_argument("--input", required=True, help="image folder, image file or dataset root")
    p.add_argument("--output", required=True, help="output folder (local, s3://, gs://)")
    p.add_argument("--split", help="dataset of a dataset root (default testA / testB)")
    p.add_argument("--batch-size", type=int, default=8, help="images per actor call (default 8)")
    p.add_argument("--load-size", type=int, help="scale the shorter side to N px first")
    p.add_argument(
        "--format", default="same", choices=OUTPUT_FORMATS, help="same (default): as the input"
    )
    p.add_argument("--num-actors", type=int, help="actors (default: one per GPU, else 1)")
    p.add_argument("--num-gpus-per-actor", type=float, help="default 1 with GPUs, else 0")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    add_address_flag(p)
    return p


def _report(result: dict, output: str) -> int:
    from pipeline.storage import redact

    device = f"{result['gpus_per_actor']:g} GPU each" if result["gpus_per_actor"] else "CPU"
    print(
        f"[translate] {result['images']} images -> {redact(output)} in "
        f"{result['seconds']:.1f} s ({result['images_per_s']:.2f} images/s, "
        f"{result['actors']} actor(s), {device})",
        flush=True,
    )
    if not result["failed"]:
        return 0
    for item in result["failed"][:20]:
        print(f"[translate] skipped {item['key']}: {item['reason']}", file=sys.stderr)
    more = len(result["failed"]) - 20
    if more > 0:
        print(f"[translate] ... and {more} more", file=sys.stderr)
    print(f"error: {len(result['failed'])} input(s) could not be read", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from pipeline.api import translate

        result = translate(
            args.model,
            args.input,
            args.output,
            args.direction,
            split=args.split,
            batch_size=args.batch_size,
            load_size=args.load_size,
            num_actors=args.num_actors,
            num_gpus_per_actor=args.num_gpus_per_actor,
            format=args.format,
            overwrite=args.overwrite,
            storage_uri=args.storage,
            arch=arch_from_flags(args),
            trust_pickle=args.trust_pickle,
            address=args.address,
        )
        return _report(result, args.output)

    return run_command(body, "translation")


if __name__ == "__main__":
    exit_with(main())
