"""Weak scaling of data-parallel training: what a train step all-reduces, what that costs, and
the 2-worker step predicted beside the one measured on this machine (no Ray).

    python -m pipeline.bench.scaling                          # demo preset, 15 s on 2 idle cores
    python -m pipeline.bench.scaling --preset tiny --rounds 3 --json scaling.json
    python -m pipeline.bench.scaling --preset paper --cloud   # the expected curve on AWS GPUs

A train step makes two DDP updates (cyclegan/train_step.py): the generator update all-reduces the
gradients of G_A and G_B (the discriminators run unwrapped and frozen), the discriminator update
those of D_A and D_B. So every parameter of the four nets is all-reduced once per step, in fp32:
the parameters, hence the gradients, stay fp32 under bf16 autocast. Each net has its own DDP
wrapper, so its own buckets (1 MiB first, then 25 MiB: DDP's defaults).

The measurement starts 2 processes (torch.multiprocessing, gloo on 127.0.0.1, one torch thread
each) and times four things in interleaved rounds, so a machine that gets busier mid-run slows
all four alike:

    single      the train step of one process while the other waits: the 1-worker step
    concurrent  both processes stepping with no communication: what sharing the machine costs
    allreduce   gloo all-reduces of buffers of DDP's bucket sizes, per update, as DDP issues them
    ddp         the real 2-worker step, each net in DistributedDataParallel as pipeline/worker.py
                wraps them (fp32, eager)

Predicted 2-worker step: ``single + allreduce`` when nothing overlaps, ``max(single, allreduce)``
when the all-reduce hides entirely behind compute. Weak-scaling efficiency is the 1-worker step
over the N-worker step (each worker keeps its batch, so N times the images per step). On a
2-core machine the two one-thread processes already take both cores: gloo's threads find no free
core, so expect the no-overlap bound here, and the 2-worker step also pays for the two workers
sharing caches and memory bandwidth ("concurrent"), which separate GPUs do not. Timings are
medians over rounds after warm-up. Each also records the CPU seconds the workers used (what the
step would take with a core to itself) and the share of the machine's CPU time other processes
took meanwhile (/proc/stat): on a shared machine compare CPU times, not wall times.

``--cloud`` measures nothing: it counts the FLOPs of one train step on the CPU and prints the
expected curve on 8-GPU AWS nodes from the ring all-reduce formula, at the link speeds and the
assumed GPU throughput in ``CLOUD_NODES`` and ``ACHIEVED_FRACTION``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cyclegan.train_step import CycleGANNets, build_nets
from pipeline import config as C
from pipeline.bench.common import (
    cpu_busy_seconds,
    environment,
    gpu_peak_tflops,
    save_result,
    summarize,
)
from pipeline.bench.scaling.report import print_report
from pipeline.bench.step import VARIANTS, StepRunner, train_step_flops

GRAD_BYTES_PER_PARAM = 4  # fp32
BUCKET_CAP_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
# DDP's first bucket once it rebuilds its buckets (dist._DEFAULT_FIRST_BUCKET_BYTES)
FIRST_BUCKET_CAP_BYTES = 2**20
UPDATES = {"G": ("G_A", "G_B"), "D": ("D_A", "D_B")}  # the nets whose gradients each update reduces
WORLD = 2
MODES = ("single", "concurrent", "allreduce", "ddp")
# (warm-up steps, timed rounds, steps per mode per round) per preset.
REPEATS = {"tiny": (2, 7, 5), "demo": (2, 5, 2), "paper128": (1, 3, 1), "paper": (1, 3, 1)}

# the model: what a step all-reduces


def param_counts(cfg: C.Config) -> dict[str, int]:
    """Parameters of G_A, G_B, D_A, D_B, built as cyclegan/ builds them."""
    nets = build_nets(cfg.model)
    return {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}


def grad_bytes(counts: dict[str, int]) -> dict[str, int]:
    """fp32 gradient bytes each update all-reduces: ``{"G": ..., "D": ...}``."""
    return {
        update: GRAD_BYTES_PER_PARAM * sum(counts[n] for n in names)
        for update, names in UPDATES.items()
    }


def ready_order(net: nn.Module) -> list[nn.Parameter]:
    """Parameters in the order backward finishes their gradients: layers last to first, each
    layer's own in registration order (weight, bias). DDP rebuilds its buckets in this order."""
    return [p for m in reversed(list(net.modules())) for p in m.parameters(recurse=False)]


def bucket_sizes(
    tensor_bytes: list[int], first_cap: int = FIRST_BUCKET_CAP_BYTES, cap: int = BUCKET_CAP_BYTES
) -> list[int]:
    """DDP's bucket assignment: fill a bucket in order until it reaches its cap (``first_cap``
    for the first, ``cap`` after), then start the next."""
    buckets, size, limit = [], 0, first_cap
    for n in tensor_bytes:
        size += n
        if size >= limit:
            buckets.append(size)
            size, limit = 0, cap
    if size:
        buckets.append(size)
    return buckets


def step_buckets(nets: CycleGANNets) -> dict[str, list[int]]:
    """Bucket sizes in bytes each update all-reduces; one DDP wrapper (own buckets) per net."""
    by_name = dict(nets.items())
    return {
        update: [
            size
            for name in names
            for size in bucket_sizes(
                [p.numel() * GRAD_BYTES_PER_PARAM for p in ready_order(by_name[name])]
            )
        ]
        for update, names in UPDATES.items()
    }


def ring_allreduce_s(
    nbytes: float, workers: int, bus_bytes_per_s: float, latency_s: float = 0.0
) -> float:
    """Ring all-reduce time: each worker sends and receives ``2 (N-1)/N`` of the buffer over its
    slowest link, plus a fixed latency; nothing with one worker (no DDP)."""
    if workers < 1:
        raise ValueError(f"workers: {workers}; need at least 1")
    if workers == 1:
        return 0.0
    return 2 * (workers - 1) / workers * nbytes / bus_bytes_per_s + latency_s


def predicted_step_s(compute_s: float, allreduce_s: float) -> tuple[float, float]:
    """(no overlap, full overlap): compute then every all-reduce; the all-reduce entirely hidden
    behind compute (or the compute behind it)."""
    return compute_s + allreduce_s, max(compute_s, allreduce_s)


def efficiency(one_worker_s: float, n_worker_s: float) -> float:
    """Weak-scaling efficiency: the 1-worker step time over the N-worker one (same batch each)."""
    return one_worker_s / n_worker_s


# the cloud: expected curve on 8-GPU AWS nodes


@dataclass(frozen=True)
class GpuNode:
    """An 8-GPU instance type. Bandwidths are per direction, in GB/s: one GPU's link inside the
    node, and the node's network (all its NICs)."""

    instance: str
    gpu: str
    intra_gb_per_s: float
    network_gb_per_s: float


# Nominal link rates; NCCL's measured bus bandwidth is lower (often 70-90% of these).
CLOUD_NODES = (
    GpuNode("g5.48xlarge", "A10G", 32.0, 12.5),  # PCIe 4.0 x16; 100 Gbit/s
    GpuNode("p4d.24xlarge", "A100", 300.0, 50.0),  # NVLink 3 600 GB/s both ways; 4x100 Gbit/s EFA
    GpuNode("p5.48xlarge", "H100", 450.0, 400.0),  # NVLink 4 900 GB/s both ways; 3200 Gbit/s EFA
)
ACHIEVED_FRACTION = 0.4  # of dense bf16 peak (pipeline/bench/common.py); an assumption
LATENCY_INTRA_S, LATENCY_INTER_S = 20e-6, 50e-6  # per all-reduce call (one per bucket); assumed
GPUS_PER_NODE = 8
CLOUD_GPUS = (1, 2, 4, 8, 16)


def cloud_curve(flops: float, nbytes: float, n_buckets: int, node: GpuNode) -> list[dict]:
    """Step time and efficiency at each of ``CLOUD_GPUS`` workers on ``node`` (two nodes past 8)."""
    compute = flops / (gpu_peak_tflops(node.gpu) * 1e12 * ACHIEVED_FRACTION)
    rows = []
    for n in CLOUD_GPUS:
        across = n > GPUS_PER_NODE
        bus = min(node.intra_gb_per_s, node.network_gb_per_s) if across else node.intra_gb_per_s
        latency = n_buckets * (LATENCY_INTER_S if across else LATENCY_INTRA_S)
        allreduce = ring_allreduce_s(nbytes, n, bus * 1e9, latency)
        no_overlap, full_overlap = predicted_step_s(compute, allreduce)
        rows.append(
            {
                "gpus": n,
                "bus_gb_per_s": bus,
                "compute_ms": 1e3 * compute,
                "allreduce_ms": 1e3 * allreduce,
                "efficiency_no_overlap": efficiency(compute, no_overlap),
                "efficiency_full_overlap": efficiency(compute, full_overlap),
            }
        )
    return rows


# the measurement: 2 processes, gloo


def _worker(rank: int, spec: dict, init_file: str, queue) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    result = _rounds(rank, spec)
    if rank == 0:
        queue.put(result)
    # Both ranks leave together: a rank whose peer's sockets close under it may abort.
    dist.barrier()
    dist.destroy_process_group()


def _rounds(rank: int, spec: dict) -> dict | None:
    # Long on purpose: the four modes are timed interleaved in one loop, so they read side by side.
    cfg = C.preset(spec["preset"])
    batch = cfg.data.batch_size
    plain = StepRunner(cfg, batch, VARIANTS["fp32"], "cpu", seed=rank)
    ddp = StepRunner(cfg, batch, VARIANTS["fp32"], "cpu", seed=rank)
    ddp.nets = CycleGANNets(**{n: DistributedDataParallel(m) for n, m in ddp.nets.items()})
    buffers = [
        [torch.zeros(size // GRAD_BYTES_PER_PARAM) for size in sizes]
        for sizes in step_buckets(plain.nets).values()
    ]

    def allreduce(k: int) -> None:
        for _ in range(k):
            for update in buffers:  # DDP issues each bucket asynchronously as it fills
                for work in [dist.all_reduce(b, async_op=True) for b in update]:
                    work.wait()

    runs = {
        "single": lambda k: plain.run(k) if rank == 0 else None,
        "concurrent": plain.run,
        "allreduce": allreduce,
        "ddp": ddp.run,
    }
    warmup, rounds, per_round = spec["warmup"], spec["rounds"], spec["steps_per_round"]
    for mode in MODES:
        # DDP rebuilds its buckets after its first step: warm it past that.
        runs[mode](max(warmup, 2) if mode == "ddp" else warmup)
    times = {m: [] for m in MODES}
    cpu_times = {m: [] for m in MODES}
    others = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES:
            dist.barrier()
            busy0, total0 = cpu_busy_seconds()
            cpu0, t0 = time.process_time(), time.perf_counter()
            runs[mode](per_round)
            wall = time.perf_counter() - t0
            dist.barrier()
            cpu = time.process_time() - cpu0
            busy1, total1 = cpu_busy_seconds()
            if mode == "single" and rank != 0:
                wall = 0.0  # only rank 0 stepped
            gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(WORLD)]
            dist.all_gather(gathered, torch.tensor([wall, cpu], dtype=torch.float64))
            walls, cpus = zip(*(g.tolist() for g in gathered), strict=True)
            times[mode].append(max(walls) / per_round)
            # CPU seconds per step of one stepping worker (rank 1 only waited in "single").
            stepping = cpus[:1] if mode == "single" else cpus
            cpu_times[mode].append(sum(stepping) / len(stepping) / per_round)
            own = sum(cpus)
            others[mode].append(max(0.0, busy1 - busy0 - own) / max(total1 - total0, 1e-9))
        if rank == 0:
            line = ", ".join(
                f"{m} {1e3 * times[m][-1]:.1f} ({100 * others[m][-1]:.0f}%)" for m in MODES
            )
            print(
                f"[scaling] round {r + 1}/{rounds}, ms/step (others' CPU share): {line}",
                flush=True,
            )
    if rank != 0:
        return None
    return {
        "times_s": times,
        "cpu_s": cpu_times,
        "others_cpu_share": others,
        "ddp_bucket_sizes": {n: _ddp_bucket_sizes(m) for n, m in ddp.nets.items()},
    }


def _ddp_bucket_sizes(net: DistributedDataParallel) -> list[int] | None:
    """The bucket sizes (bytes) DDP itself chose after its rebuild, from its logging data."""
    sizes = net._get_ddp_logging_data().get("rebuilt_bucket_sizes")
    return [int(s) for s in str(sizes).split(",")] if sizes else None


def measure(spec: dict) -> dict:
    """Start the 2 processes, run the rounds, return rank 0's numbers."""
    queue = torch_mp.get_context("spawn").SimpleQueue()
    result = None
    with tempfile.TemporaryDirectory(prefix="cyclegan-scaling-") as tmp:
        procs = torch_mp.start_processes(
            _worker,
            args=(spec, os.path.join(tmp, "store"), queue),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        # join() raises with the worker's traceback when one fails, and stops the other.
        while not procs.join(timeout=1):
            if result is None and not queue.empty():
                result = queue.get()  # read while waiting: a full pipe would block rank 0
    if result is None and not queue.empty():
        result = queue.get()
    if result is None:
        raise RuntimeError("the scaling processes exited without a result")
    return result


# the report


def run(args: argparse.Namespace) -> dict:
    cfg = C.preset(args.preset)
    counts = param_counts(cfg)
    per_update = grad_bytes(counts)
    buckets = step_buckets(build_nets(cfg.model))
    res = {
        "command": "scaling",
        "preset": args.preset,
        "crop_size": cfg.data.crop_size,
        "batch_size": cfg.data.batch_size,
        "model": asdict(cfg.model),
        "param_counts": counts,
        "params_total": sum(counts.values()),
        "grad_bytes_per_update": per_update,
        "grad_bytes_per_step": sum(per_update.values()),
        "updates": UPDATES,
        "bucket_sizes": buckets,
        "env_cpus": os.cpu_count(),
    }
    if args.cloud:
        print(
            f"[scaling] counting the FLOPs of one {args.preset} train step on the CPU", flush=True
        )
        flops = train_step_flops(cfg, cfg.data.batch_size)
        n_buckets = sum(len(b) for b in buckets.values())
        res["cloud"] = {
            "flops_per_step": flops,
            "achieved_fraction": ACHIEVED_FRACTION,
            "latency_intra_s": LATENCY_INTRA_S,
            "latency_inter_s": LATENCY_INTER_S,
            "gpus_per_node": GPUS_PER_NODE,
            "nodes": [
                {
                    **asdict(node),
                    "bf16_peak_tflops": gpu_peak_tflops(node.gpu),
                    "curve": cloud_curve(flops, res["grad_bytes_per_step"], n_buckets, node),
                }
                for node in CLOUD_NODES
            ],
        }
        return res
    warmup, rounds, per_round = REPEATS.get(args.preset, (1, 3, 1))
    spec = {
        "preset": args.preset,
        "warmup": args.warmup if args.warmup is not None else warmup,
        "rounds": args.rounds or rounds,
        "steps_per_round": args.steps_per_round or per_round,
    }
    print(
        f"[scaling] preset {args.preset}: {cfg.data.crop_size} px, batch {cfg.data.batch_size}; "
        f"{WORLD} processes, gloo on 127.0.0.1, 1 torch thread each, fp32 eager; warm-up "
        f"{spec['warmup']}, {spec['rounds']} rounds x {spec['steps_per_round']} steps per mode",
        flush=True,
    )
    res.update(spec)
    res.update(measure(spec))
    res["summary"] = summarize_rounds(res["times_s"], res["cpu_s"], res["others_cpu_share"])
    return res


def summarize_rounds(times: dict, cpu: dict, others: dict) -> dict:
    """Medians per mode; the 2-worker step predicted from the 1-worker step (the formula) and
    from the compute of two workers stepping at once (what sharing this machine costs), beside
    the measured one; weak-scaling efficiencies against the 1-worker step."""
    med = {m: statistics.median(times[m]) for m in MODES}
    cpu_med = {m: statistics.median(cpu[m]) for m in MODES}
    predicted = {}
    for basis in ("single", "concurrent"):
        no_overlap, full_overlap = predicted_step_s(med[basis], med["allreduce"])
        predicted[basis] = {
            "no_overlap_ms": 1e3 * no_overlap,
            "full_overlap_ms": 1e3 * full_overlap,
            "efficiency_no_overlap": efficiency(med["single"], no_overlap),
            "efficiency_full_overlap": efficiency(med["single"], full_overlap),
        }
    return {
        "ms": {m: summarize([1e3 * t for t in times[m]]) for m in MODES},
        "cpu_ms": {m: summarize([1e3 * t for t in cpu[m]]) for m in MODES},
        "others_cpu_share": {m: summarize(others[m]) for m in MODES},
        "predicted": predicted,
        "measured_ms": 1e3 * med["ddp"],
        "measured_efficiency": efficiency(med["single"], med["ddp"]),
        "cpu_per_worker_step_ms": {
            **{
                basis: 1e3 * (cpu_med[basis] + cpu_med["allreduce"])
                for basis in ("single", "concurrent")
            },
            "measured": 1e3 * cpu_med["ddp"],
        },
    }


def _count(least: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: need at least {least}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.bench.scaling",
        description="Weak scaling: gradient bytes, all-reduce time, 2-worker DDP step "
        "predicted vs measured here (gloo, no Ray), or the expected curve on AWS GPUs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--preset", default="demo", choices=list(C.PRESETS))
    p.add_argument(
        "--cloud",
        action="store_true",
        help="measure nothing: count FLOPs and print the expected curve on 8-GPU AWS nodes",
    )
    p.add_argument("--warmup", type=_count(0), help="untimed steps per mode first")
    p.add_argument("--rounds", type=_count(1), help="timed rounds over the four modes")
    p.add_argument("--steps-per-round", type=_count(1), help="steps per mode per round")
    p.add_argument("--json", help="write every number here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cloud and (args.warmup, args.rounds, args.steps_per_round) != (None, None, None):
        parser.error("--cloud measures nothing: leave out --warmup, --rounds, --steps-per-round")
    env = environment(args.preset)
    result = run(args)
    print_report(result)
    save_result(result, env, args.json, "scaling")
    return 0
