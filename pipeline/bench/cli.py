"""Benchmarks: the train step alone, the data path, and short training runs.

    python -m pipeline.bench step --preset demo --no-compile --repeats 15   # about a minute
    python -m pipeline.bench step --preset demo --variants fp32,bf16,compile,compile_bf16
    python -m pipeline.bench step --preset paper --no-compile               # several minutes
    python -m pipeline.bench step --preset paper --variants fp32,bf16 --threads 1 --json p.json
    python -m pipeline.bench data --load-size 286 --crop-size 256 --workers 1,2 --json data.json
    python -m pipeline.bench train --preset demo --max-steps 150 --workers 1,2 --json train.json
    python -m pipeline.bench startup --repeats 3               # time to first step, by phase
    python -m pipeline.bench translate --images 1000 --size 256  # vs the pure forward pass
    python -m pipeline.bench overhead                          # a real run vs the bare step
    python -m pipeline.bench scaling --preset demo           # 2 gloo processes, about 15 s
    python -m pipeline.bench scaling --preset paper --cloud  # the expected curve on GPU nodes
    python -m pipeline.bench gpu --json gpu-check.json       # CUDA only: the GPU check
    python -m pipeline.bench gpu                                  # CUDA only, aims at < 8 min

``step`` runs each variant (fp32, bf16 autocast, channels_last, torch.compile, ...) in its own
process, so peak memory and compile caches are per variant; the parent times the variants in
turn (A B C A B C ...), so a machine that gets busier or quieter mid-run shifts every variant
alike, and each speedup is the median of per-round ratios against fp32 eager. Each timing also
records the share of the machine's CPU time other processes took meanwhile; on a shared machine
multi-threaded steps slow down many times over when another process takes a core, so medians
over quiet rounds are reported beside those over all rounds. ``images/s`` counts one (A, B)
pair as one image, as the training metric ``throughput/images_per_s`` does. FLOPs are those of
the convolutions and matmuls of one whole train step, forward and backward, counted once with
``torch.utils.flop_counter.FlopCounterMode``.

``data``, ``train``, ``startup``, ``translate`` and ``overhead`` start a local Ray: run them when no other Ray cluster runs on the host.

``gpu`` (``make gpu-check``) proves the CUDA path in one command: the tests marked ``gpu``, a
short training run through Ray Train and MLflow, a translation with a GPU actor, and ``step
--preset paper`` over the CUDA speed-ups (GPU_VARIANTS) with achieved TFLOP/s and the fraction
of the GPU's dense bf16 peak. It writes one JSON with every number and each phase's pass or
fail, and exits 1 on any failure; without a CUDA GPU it exits 2 at once. It starts its own local
Ray: run it when no other Ray cluster runs on the host.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import config as C
from pipeline.bench.common import environment, save_result
from pipeline.bench.data import bench_data, print_data
from pipeline.bench.overhead import add_parser as add_overhead_parser
from pipeline.bench.overhead import bench_overhead, print_overhead
from pipeline.bench.startup import add_parser as add_startup_parser
from pipeline.bench.startup import bench_startup, print_startup
from pipeline.bench.step import DEFAULT_VARIANTS, VARIANTS, bench_step, print_step
from pipeline.bench.train import bench_train, print_train
from pipeline.bench.translate import add_parser as add_translate_parser
from pipeline.bench.translate import bench_translate, print_translate


def build_parser() -> argparse.ArgumentParser:
    # Long on purpose: one flag list per benchmark, read top to bottom; splitting it would scatter the flags.
    p = argparse.ArgumentParser(
        prog="python -m pipeline.bench",
        description="Benchmark the train step, the data path, or short training runs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step", help="the train step alone, per variant, on random inputs")
    step.add_argument("--preset", default="demo", help=f"one of {', '.join(C.PRESETS)}")
    step.add_argument(
        "--variants",
        help=f"comma-separated, of {', '.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})",
    )
    step.add_argument("--no-compile", action="store_true", help="leave out the compile variants")
    step.add_argument("--batch-size", type=int, help="images per domain (default: the preset's)")
    step.add_argument("--warmup", type=int, help="untimed steps per variant first")
    step.add_argument("--repeats", type=int, help="timed rounds over all variants")
    step.add_argument("--steps-per-repeat", type=int, help="steps per variant per round")
    step.add_argument("--threads", type=int, help="torch threads (default: the usable CPUs)")
    step.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when there is one")
    step.add_argument(
        "--quiet-below",
        type=float,
        default=0.15,
        help="a round counts as quiet when other processes took less than this share of the "
        "CPUs (default 0.15); quiet-round medians are reported too",
    )
    data = sub.add_parser("data", help="decode + augment images/s: Ray Data vs a DataLoader")
    data.add_argument("--load-size", type=int, default=286)
    data.add_argument("--crop-size", type=int, default=256)
    data.add_argument("--source-size", type=int, default=300, help="side of the stored JPEGs")
    data.add_argument(
        "--images", type=int, default=1024, help="JPEGs in the shards (horse2zebra: 1067)"
    )
    data.add_argument("--root", help="where the shards go (default $CYCLEGAN_HOME/bench/...)")
    data.add_argument("--workers", default="1,2", help="CPUs per measurement, comma-separated")
    data.add_argument("--batch-size", type=int, default=16)
    data.add_argument(
        "--cache-mb",
        type=int,
        default=C.DataConfig.cache_mb,
        help="data.cache_mb of the Ray Data path (0: read the shards on every pass)",
    )
    data.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    data.add_argument("--warmup-batches", type=int, default=4)
    data.add_argument("--repeats", type=int, default=2, help="rounds over all measurements")
    train = sub.add_parser("train", help="short runs of pipeline.train, 1 and 2 workers")
    train.add_argument("--preset", default="demo", help="tiny or demo are a few minutes")
    train.add_argument("--max-steps", type=int, help="steps per run (default 200 tiny, 150 demo)")
    train.add_argument("--log-every", type=int, help="steps per metric interval")
    train.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    train.add_argument("--repeats", type=int, default=1)
    train.add_argument("--data", help="dataset root (default: built-in scenes of --images)")
    train.add_argument(
        "--images",
        default="500",
        help="built-in scenes per domain, comma-separated sizes (e.g. 500,5000: memory vs size)",
    )
    train.add_argument("--home", help="runs, MLflow store (default $CYCLEGAN_HOME/bench)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    startup = add_startup_parser(sub)
    translate = add_translate_parser(sub)
    overhead = add_overhead_parser(sub)
    for sp in (step, data, train, startup, translate, overhead):
        sp.add_argument("--json", metavar="FILE", help="write every number and the environment")
    gpu = sub.add_parser(
        "gpu",
        help="CUDA only: GPU tests, a GPU training run, a GPU translation, the paper step",
    )
    gpu.add_argument(
        "--json",
        metavar="FILE",
        help="where the report goes (default $CYCLEGAN_HOME/bench/gpu-check-TIME.json)",
    )
    gpu.add_argument(
        "--phases",
        default="tests,train,translate,step",
        help="comma-separated, of tests, train, translate (needs train), step (default all)",
    )
    gpu.add_argument(
        "--min-fraction-of-peak",
        type=float,
        default=0.40,
        help="the best step variant must reach this share of the dense bf16 peak (default "
        "0.40; 0 only reports it)",
    )
    gpu.add_argument(
        "--timeout-s",
        type=float,
        default=570.0,
        help="the whole check stops after this many seconds; a phase cut short fails (default 570)",
    )
    sub.add_parser(
        "scaling",
        help="DDP weak scaling: gradient bytes, all-reduce time, 2-process check (see "
        "cluster/README.md); its own flags: bench scaling --help",
        add_help=False,
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["scaling"]:  # its own parser (pipeline/bench/scaling), loaded only here
        from pipeline.bench.scaling import main as scaling_main

        return scaling_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "gpu":
        # Imported here: it checks for CUDA before anything else is loaded or started.
        from pipeline.bench.gpu import run_gpu_check

        return run_gpu_check(args)
    run, show = {
        "step": (bench_step, print_step),
        "data": (bench_data, print_data),
        "train": (bench_train, print_train),
        "startup": (bench_startup, print_startup),
        "translate": (bench_translate, print_translate),
        "overhead": (bench_overhead, print_overhead),
    }[args.command]
    env = environment(getattr(args, "preset", None))
    try:
        result = run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    show(result)
    save_result(result, env, args.json, "bench")
    return 0
